"""Alignment: a face warped by its 5 landmarks onto the ArcFace template, as the recognizer and CLIP see it, or
onto the FFHQ template at 512, as PuLID reads it."""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import FaceIDError

__all__ = ["ARCFACE_TEMPLATE", "FFHQ_TEMPLATE_512", "align_face", "align_ffhq"]

#: insightface's ``arcface_dst``: where the 5 landmarks land in the 112x112 aligned crop
#: (image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_TEMPLATE.setflags(write=False)


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face onto the ArcFace 5-point template scaled to ``size`` x ``size``.

    Identical to insightface's ``face_align.norm_crop(img, kps, image_size=size)`` for sizes that are
    multiples of 112 (112 for ArcFace, 224 for the Plus variants' CLIP crop): a least-squares similarity
    transform (Umeyama, as skimage estimates it) from the landmarks to ``ARCFACE_TEMPLATE * size / 112``,
    applied with ``cv2.warpAffine`` (bilinear, black border). Other sizes scale the same template.
    """
    # Not norm_crop itself: its estimate_norm calls SimilarityTransform.estimate, deprecated by the
    # pinned scikit-image (a FutureWarning per face, and the call goes away in skimage 2.2), and returns a
    # NaN matrix for degenerate landmarks instead of failing; the result is otherwise the same to the
    # bit (tests/test_faces.py compares the two).
    from skimage.transform import SimilarityTransform  # skimage is slow to import; only needed here

    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    lmk = np.asarray(landmarks, dtype=np.float32)
    if lmk.shape != (5, 2) or not np.isfinite(lmk).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {lmk.shape}")
    # float32 template * python float, exactly as insightface's estimate_norm computes its target.
    dst = ARCFACE_TEMPLATE * (float(size) / 112.0)
    tform = SimilarityTransform.from_estimate(lmk, dst)
    if not tform:  # skimage returns a falsy failure object for degenerate (e.g. collinear) points
        raise FaceIDError("Cannot align the face: its 5 landmarks are degenerate (all on one point or line).")
    matrix = tform.params[0:2, :]
    return cv2.warpAffine(image_rgb, matrix, (size, size), borderValue=0.0)


#: facexlib's 5 landmarks of an FFHQ face at 512x512 (``FaceRestoreHelper.face_template``), where PuLID aligns faces.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]]
)  # fmt: skip
FFHQ_TEMPLATE_512.setflags(write=False)
FFHQ_BORDER_RGB = (132, 133, 135)  # facexlib's gray border, (135, 133, 132) in the BGR image it warps


def align_ffhq(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """The face warped onto the FFHQ 5-point template at ``size`` x ``size`` as facexlib's ``align_warp_face``
    (what PuLID reads): a 4-degree-of-freedom similarity estimated robustly (``cv2.estimateAffinePartial2D``,
    LMEDS), bilinear, facexlib's gray outside the photo."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {points.shape}")
    matrix = cv2.estimateAffinePartial2D(points, FFHQ_TEMPLATE_512 * (size / 512.0), method=cv2.LMEDS)[0]
    if matrix is None:
        raise FaceIDError("Cannot align the face: its 5 landmarks are degenerate (all on one point or line).")
    return cv2.warpAffine(
        np.ascontiguousarray(image_rgb), matrix, (size, size), borderMode=cv2.BORDER_CONSTANT,
        borderValue=FFHQ_BORDER_RGB,
    )  # fmt: skip

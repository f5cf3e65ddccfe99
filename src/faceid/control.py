"""Control images for ControlNet, made from a reference photo, in the frame of the generated image.

:func:`make_control_image` turns a photo into the image a ControlNet of that kind is conditioned on:

* ``"canny"``: OpenCV's Canny edges, white on black, 3 channels (what the canny ControlNets were trained on);
* ``"kps"``: the 5 face landmarks drawn the way InstantID draws them (coloured sticks from each eye and mouth
  corner to the nose tip, a disc at each point, on black), from faceid's own face analysis;
* ``"pose"``: the OpenPose body skeleton (18 COCO keypoints, OpenPose's colours), from the OpenPose body
  network (:mod:`faceid.openpose`);
* ``"depth"``: relative depth (near = bright) from transformers' depth-estimation pipeline, 3 channels
  (:mod:`faceid.depth`);
* ``"image"``: the photo as it is (it already is a control image).

This module holds what every kind shares: the frame a photo is fitted into and the drawing of keypoints.

**Size.** The control image is made in the frame of the generated image: ``size=(width, height)``, or the
photo's own size when ``None``. The photo is fitted to that frame keeping its aspect ratio, the way the
ControlNet web UI's resize modes do: ``fit="crop"`` (its default, "Crop and Resize": scaled to cover the
frame, centred, the overflow cut off) or ``fit="pad"`` ("Resize and Fill": scaled to fit inside, centred,
black bars). Face landmarks are found on the full photo, body keypoints on a copy at most 512 px on its longest
side (:func:`faceid.openpose.detect_people`: decoding OpenPose's maps at a large photo's own size would take
gigabytes); both are mapped into that frame, and their drawings are made at the output size, so sticks and
discs keep their width and colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .depth import depth_pipeline
from .errors import FaceIDError, NoPersonError
from .images import ImageSource, load_image, source_name
from .openpose import COLORS as POSE_COLORS
from .openpose import LIMBS as POSE_LIMBS
from .openpose import OpenPoseBody, detect_people

__all__ = [
    "FITS",
    "KINDS",
    "annotator_options",
    "draw_kps",
    "draw_skeleton",
    "face_kps_image",
    "make_control_image",
]

KINDS = ("canny", "kps", "pose", "depth", "image")
FITS = ("crop", "pad")

# InstantID's draw_kps: sticks from each eye and mouth corner to the nose tip, coloured as their outer point.
_KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
_KPS_LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]

_OPTIONS = {
    "canny": {"low_threshold", "high_threshold"},
    "kps": set(),
    "pose": {"pose_model", "device"},
    "depth": {"depth_model", "device"},
    "image": set(),
}


def make_control_image(
    kind: str,
    image: ImageSource,
    *,
    size: tuple[int, int] | None = None,
    analyzer=None,
    face_index: int | str = 0,
    fit: str = "crop",
    **options: Any,
) -> Image.Image:
    """The ``kind`` control image of ``image`` (a path, bytes, PIL image or array), as an RGB PIL image of
    ``size`` = (width, height) (default: the photo's size), the photo fitted to it by ``fit`` (module doc).

    ``analyzer`` (``"kps"``): the :class:`~faceid.faces.FaceAnalyzer` (default: buffalo_l); ``face_index``
    chooses among several faces, largest first, or ``"all"`` draws every face (several people). Options by kind: ``"canny"``: ``low_threshold`` (100),
    ``high_threshold`` (200); ``"pose"``: ``pose_model`` (a ``body_pose_model.pth`` path, or an
    :class:`~faceid.openpose.OpenPoseBody`; default the pinned Hub file), ``device``; ``"depth"``:
    ``depth_model`` (a transformers depth-estimation model name or folder, or a ready ``pipeline``; default
    :data:`faceid.depth.DEPTH_MODEL`), ``device``.

    Raises :class:`~faceid.errors.ImageError` for an unreadable photo, ``NoFaceError`` /
    ``FaceSelectionError`` for ``"kps"`` without that face, :class:`~faceid.errors.NoPersonError` for
    ``"pose"`` without a person, and :class:`~faceid.errors.FaceIDError` for an unknown kind or option.
    """
    import cv2  # here, not at import: the CLI builds its parser without it

    if kind not in KINDS:
        raise FaceIDError(f"unknown control image kind {kind!r}: use one of {', '.join(KINDS)}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        takes = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise FaceIDError(f"unknown option(s) {', '.join(unknown)} for a {kind} control image (it takes: {takes})")
    if fit not in FITS:
        raise FaceIDError(f"unknown fit {fit!r}: use one of {', '.join(FITS)}")
    name = source_name(image)
    photo = load_image(image)
    out_size = _check_size(photo.size if size is None else size)
    frame = _Frame(photo.size, out_size, fit)

    if kind == "kps":
        from .faces import FaceAnalyzer, select_face

        analyzer = analyzer if analyzer is not None else FaceAnalyzer.from_pretrained()
        found = analyzer.analyze(photo)
        if face_index == "all":
            faces = found or [select_face(found, 0, name)]  # none found: the no-face error
        else:
            faces = [select_face(found, face_index, name)]
        canvas = np.zeros((out_size[1], out_size[0], 3), np.uint8)
        for face in faces:
            draw_kps(out_size, frame.points(face.landmarks), canvas)
        return Image.fromarray(canvas)
    if kind == "pose":
        body = options.get("pose_model")
        if not isinstance(body, OpenPoseBody):
            body = OpenPoseBody.from_pretrained(body, device=options.get("device"))
        people = detect_people(body, photo)
        if not people:
            raise NoPersonError(
                f"no person found in {name} for a pose control image; give a photo with a person, "
                "or another control kind"
            )
        canvas = np.zeros((out_size[1], out_size[0], 3), np.uint8)
        for person in people:  # the first 17 limbs: the ear-shoulder ones only help association
            draw_skeleton(out_size, frame.points(person), POSE_LIMBS[:17], POSE_COLORS, POSE_COLORS, 4, canvas)
        return Image.fromarray(canvas)

    fitted = frame.image(photo)
    if kind == "canny":
        low, high = options.get("low_threshold", 100), options.get("high_threshold", 200)
        edges = cv2.Canny(np.asarray(fitted), low, high)
        return Image.fromarray(edges).convert("RGB")
    if kind == "depth":
        return depth_pipeline(options.get("depth_model"), options.get("device"))(fitted)["depth"].convert("RGB")
    return fitted  # "image"


def face_kps_image(face, size: tuple[int, int], fit: str = "crop") -> Image.Image:
    """The keypoint image of an analysed ``Face`` (``faceid.faces.Face``) in the frame of an image of ``size`` =
    (width, height): its photo fitted to that frame by ``fit``, as ``make_control_image("kps", photo, size=size)``
    draws it, without analysing the photo again (InstantID's IdentityNet reads it)."""
    if fit not in FITS:
        raise FaceIDError(f"unknown fit {fit!r}: use one of {', '.join(FITS)}")
    photo_size = getattr(face, "image_size", None)
    if photo_size is None:
        raise FaceIDError(
            "this face has no photo size, so its keypoints cannot be placed in the image: analyse the photo with "
            "faceid's FaceAnalyzer, or give the keypoint photo (kps=PHOTO, --kps PHOTO)"
        )
    out_size = _check_size(size)
    return draw_kps(out_size, _Frame(tuple(photo_size), out_size, fit).points(face.landmarks))


def annotator_options(kind: str, device=None) -> dict[str, Any]:
    """The models ``make_control_image(kind, ...)`` would load on every call (OpenPose's body network for
    ``"pose"``, the depth pipeline for ``"depth"``; none for the other kinds), loaded once on ``device``: pass
    them as its options to make many control images (``make_control_image(kind, photo, **options)``)."""
    if kind not in KINDS:
        raise FaceIDError(f"unknown control image kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "pose":
        return {"pose_model": OpenPoseBody.from_pretrained(device=device)}
    if kind == "depth":
        return {"depth_model": depth_pipeline(None, device)}
    return {}


# ----------------------------------------------------------------------------------------------- geometry


def _check_size(size) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise FaceIDError(f"control image size must be (width, height), got {size!r}") from None
    if width <= 0 or height <= 0:
        raise FaceIDError(f"control image size must be positive, got {width}x{height}")
    return width, height


class _Frame:
    """Where the photo lands in the output frame: the source box it shows, scaled onto the destination box."""

    def __init__(self, photo_size: tuple[int, int], out_size: tuple[int, int], fit: str) -> None:
        (w, h), (ow, oh) = photo_size, out_size
        if fit == "crop":  # cover the frame, centred; cut the overflow
            scale = max(ow / w, oh / h)
            sw, sh = ow / scale, oh / scale
            self.src = ((w - sw) / 2, (h - sh) / 2, (w + sw) / 2, (h + sh) / 2)
            self.dst = (0, 0, ow, oh)
        else:  # "pad": fit inside the frame, centred; black bars
            scale = min(ow / w, oh / h)
            dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
            x0, y0 = (ow - dw) // 2, (oh - dh) // 2
            self.src = (0.0, 0.0, float(w), float(h))
            self.dst = (x0, y0, x0 + dw, y0 + dh)
        self.out_size = out_size

    def points(self, points: np.ndarray) -> np.ndarray:
        """Photo pixel coordinates (N, 2) -> output pixel coordinates (NaN stays NaN)."""
        sx0, sy0, sx1, sy1 = self.src
        dx0, dy0, dx1, dy1 = self.dst
        scale = np.array([(dx1 - dx0) / (sx1 - sx0), (dy1 - dy0) / (sy1 - sy0)])
        return (np.asarray(points, np.float64) - (sx0, sy0)) * scale + (dx0, dy0)

    def image(self, photo: Image.Image) -> Image.Image:
        dx0, dy0, dx1, dy1 = self.dst
        fitted = photo.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS, box=self.src)
        if fitted.size == self.out_size:
            return fitted
        canvas = Image.new("RGB", self.out_size)
        canvas.paste(fitted, (dx0, dy0))
        return canvas


# ----------------------------------------------------------------------------------------------- drawing


def draw_skeleton(
    size: tuple[int, int],
    points: np.ndarray,
    limbs: Sequence[tuple[int, int]],
    limb_colors: Sequence[tuple[int, int, int]],
    point_colors: Sequence[tuple[int, int, int]],
    radius: int,
    canvas: np.ndarray | None = None,
    stickwidth: int = 4,
) -> Image.Image:
    """Keypoints drawn the way InstantID (``draw_kps``) and OpenPose (``draw_bodypose``) draw them, on black
    (or onto ``canvas``, an HxWx3 uint8 array, in place): each limb a filled ellipse ``stickwidth`` wide in 60%
    of its colour, then a disc of ``radius`` in full colour at each point. Points with NaN are skipped."""
    import cv2  # here, not at import: the CLI builds its parser without it

    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8) if canvas is None else canvas
    points = np.asarray(points, np.float64)
    for (a, b), color in zip(limbs, limb_colors, strict=False):
        (xa, ya), (xb, yb) = points[a], points[b]
        if np.isnan([xa, ya, xb, yb]).any():
            continue
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        polygon = cv2.ellipse2Poly(center, (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for (x, y), color in zip(points, point_colors, strict=False):
        if not np.isnan([x, y]).any():
            cv2.circle(canvas, (int(x), int(y)), radius, color, -1)
    return Image.fromarray(canvas)


def draw_kps(size: tuple[int, int], landmarks: np.ndarray, canvas: np.ndarray | None = None) -> Image.Image:
    """A face's 5 landmarks (eyes, nose tip, mouth corners; output pixels) drawn as InstantID's ``draw_kps``
    draws them (InfiniteYou's is the same drawing): on black of ``size`` = (width, height), or onto ``canvas``."""
    colors = [_KPS_COLORS[a] for a, _ in _KPS_LIMBS]
    return draw_skeleton(size, landmarks, _KPS_LIMBS, colors, _KPS_COLORS, 10, canvas)

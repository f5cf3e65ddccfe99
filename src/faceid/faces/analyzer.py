"""The analyzer: a detector and a recognizer together -> :class:`Face` (box, landmarks, embedding, aligned
crops), robust to real photos (huge photos, faces filling the whole frame, small faces), and the choice of
one face among several.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import FaceIDError, FaceSelectionError, NoFaceError
from ..images import ImageSource, load_image, source_name
from .align import align_face, align_ffhq
from .detect import Detection, Detector, SCRFDDetector, YuNetDetector, box_area
from .model_files import pretrained_models
from .recognize import ONNXRecognizer, Recognizer

__all__ = ["DEFAULT_DET_SIZES", "Face", "FaceAnalyzer", "select_face"]

# Detection sizes FaceAnalyzer tries: buffalo_l's 640x640 first (what the weights expect), then a
# larger size as a retry for faces too small to be found at 640.
DEFAULT_DET_SIZES: tuple[tuple[int, int], ...] = ((640, 640), (1280, 1280))


FFHQ_CROP_PACK = "antelopev2"
"""With this pack's recognizer the analysis also keeps the FFHQ-aligned crop (``Face.crop_ffhq``, PuLID's)."""


@dataclass(eq=False, repr=False)
class Face:
    """A detected, aligned and embedded face.

    ``box`` and ``landmarks`` are in the pixels of the original (EXIF-rotated) image. ``embedding`` is
    L2-normalised (insightface's ``normed_embedding``), the analyzer's main recognizer's (buffalo_l's, what FaceID
    reads). ``aligned`` is the 112x112 RGB crop the recognizers saw; ``crop_224`` is the same alignment at
    224x224, the CLIP input of the Plus variants. ``embeddings`` / ``raw_embeddings``: the vector of every
    recognizer the analyzer ran, by insightface pack (``"buffalo_l"``, ``"antelopev2"``), normalised and as the
    recognizer gave it (InstantID and PuLID read antelopev2's raw vector); see :meth:`embedding_for`.
    ``image_size``: (width, height) of the photo the box and landmarks are in (None: not known), the frame a
    keypoint image is drawn from (InstantID's IdentityNet).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray
    aligned: np.ndarray
    crop_224: np.ndarray
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    raw_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    # The face aligned to the FFHQ template at 512x512 (``align_ffhq``), what PuLID reads: made when the analysis
    # runs antelopev2's recognizer (the pack of the methods beside FaceID), None otherwise.
    crop_ffhq: np.ndarray | None = None

    def embedding_for(self, pack: str, normalised: bool = True) -> np.ndarray:
        """The vector of ``pack``'s recognizer (L2-normalised, or raw), or the error that says how to get it."""
        table = self.embeddings if normalised else self.raw_embeddings
        if pack not in table:
            have = ", ".join(self.embeddings) or "none named"
            raise FaceIDError(
                f"this face was embedded without insightface's {pack} recognizer (it has: {have}): analyse the "
                f"photo with a FaceAnalyzer that has {pack}'s models (FaceAnalyzer.from_pretrained(name={pack!r}), "
                f"or extra_packs={{{pack!r}: FOLDER}})"
            )
        return table[pack]

    @property
    def area(self) -> float:
        return box_area(self.box)

    def __repr__(self) -> str:  # arrays would flood logs; show what identifies the face
        x1, y1, x2, y2 = (round(float(v), 1) for v in self.box)
        return f"Face(box=({x1}, {y1}, {x2}, {y2}), score={self.score:.3f}, dim={self.embedding.shape[0]})"


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


# ----------------------------------------------------------------------------------------------
# Analyzer


class FaceAnalyzer:
    """Detect, align and embed faces; choose one.

    ``det_sizes``: detection sizes to try, in order. The first (640x640 for buffalo_l) is what FaceID
    was trained with; later ones are only used when nothing is found, to catch small faces.
    ``max_detect_side``: photos with a longer side are downscaled (area filter) for detection only;
    landmarks are mapped back and alignment always samples the full-resolution image.
    ``pack``: the insightface pack ``recognizer`` belongs to (None: a recognizer of no pack);
    ``extra_recognizers``: more recognizers by pack, run on the same aligned crops, so that one analysis gives a
    face the embedding of every method (``Face.embeddings``). One detector serves all: buffalo_l's and
    antelopev2's are the same SCRFD model.
    """

    def __init__(
        self,
        detector: Detector,
        recognizer: Recognizer,
        det_sizes: Sequence[tuple[int, int]] = DEFAULT_DET_SIZES,
        max_detect_side: int = 4096,
        *,
        pack: str | None = "buffalo_l",
        extra_recognizers: Mapping[str, Recognizer] | None = None,
    ) -> None:
        if not det_sizes:
            raise ValueError("det_sizes must name at least one detection size")
        extra = dict(extra_recognizers or {})
        if pack is not None and pack in extra:
            raise ValueError(f"{pack!r} is the main recognizer's pack: give it once")
        self.detector = detector
        self.recognizer = recognizer
        self.pack = pack
        self.extra_recognizers = extra
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
        raw, embeddings = _embed(self.recognizer, aligned)
        by_pack = {self.pack: (raw, embeddings)} if self.pack is not None else {}
        by_pack.update({pack: _embed(rec, aligned) for pack, rec in self.extra_recognizers.items()})
        faces = [
            Face(
                box=d.box,
                score=d.score,
                landmarks=d.landmarks,
                embedding=embeddings[i].copy(),
                aligned=aligned[i],
                crop_224=align_face(rgb, d.landmarks, 224),
                embeddings={pack: normed[i].copy() for pack, (_, normed) in by_pack.items()},
                raw_embeddings={pack: vectors[i].copy() for pack, (vectors, _) in by_pack.items()},
                image_size=(rgb.shape[1], rgb.shape[0]),
                crop_ffhq=align_ffhq(rgb, d.landmarks) if FFHQ_CROP_PACK in by_pack else None,
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
    def from_pretrained(
        cls,
        models_dir: str | os.PathLike | None = None,
        name: str = "buffalo_l",
        download: bool = True,
        *,
        extra_packs: Mapping[str, str | os.PathLike | None] | None = None,
        **kwargs,
    ) -> FaceAnalyzer:
        """The face analyzer of every faceid command and of training: insightface's ``name`` pack (buffalo_l, what
        FaceID was trained on; antelopev2 for InstantID and PuLID), or a folder's models.

        ``models_dir`` (the CLI's ``--face-models DIR``): a folder of ONNX models. Detector: the pack's
        (``det_10g.onnx``, ``scrfd_10g_bnkps.onnx``; else another ``det_*.onnx`` / ``scrfd*.onnx``) -> SCRFD, else
        a ``*yunet*.onnx`` -> YuNet. Recognizer: the pack's (``w600k_r50.onnx``, ``glintr100.onnx``), else the
        single other ``.onnx`` file whose input is 112x112; a folder with the other pack's recognizer is refused.
        A folder without them is a :class:`MissingWeightsError` that names what is missing and where to get it;
        nothing is downloaded into it. Without ``models_dir``: the ``name`` pack from
        ``$FACEID_HOME/models/<name>`` (default ``~/.cache/faceid/models/<name>``) or insightface's
        ``~/.insightface/models/<name>``, downloaded once into the first when missing and ``download``.
        ``extra_packs``: more packs whose recognizers run on every face too (pack -> its folder, or None for the
        cache), e.g. ``{"antelopev2": None}`` beside buffalo_l. insightface's models are for non-commercial
        research use. Extra keyword arguments go to the FaceAnalyzer constructor.
        """
        detector_path, recognizer_path = pretrained_models(models_dir, name, download)
        is_yunet = "yunet" in detector_path.name.lower()
        detector: Detector = YuNetDetector(detector_path) if is_yunet else SCRFDDetector(detector_path)
        extra = {
            pack: ONNXRecognizer(pretrained_models(folder, pack, download)[1])
            for pack, folder in (extra_packs or {}).items()
            if pack != name
        }
        return cls(detector, ONNXRecognizer(recognizer_path), pack=name, extra_recognizers=extra, **kwargs)

    def with_pack(self, pack: str, models_dir: str | os.PathLike | None = None) -> FaceAnalyzer:
        """A new analyzer with this one's detector and recognizers and pack ``pack``'s recognizer too (from
        ``models_dir``, else faceid's or insightface's cache; nothing is downloaded): what a pipeline that loads
        InstantID or PuLID analyses faces with. This analyzer is left as it is (callers may share it)."""
        if pack == self.pack or pack in self.extra_recognizers:
            return self
        _, recognizer = pretrained_models(models_dir, pack, download=False)
        return FaceAnalyzer(
            self.detector,
            self.recognizer,
            self.det_sizes,
            self.max_detect_side,
            pack=self.pack,
            extra_recognizers={**self.extra_recognizers, pack: ONNXRecognizer(recognizer)},
        )

    def with_recognizer(self, name: str, recognizer: Recognizer) -> FaceAnalyzer:
        """A new analyzer with this one's detector and recognizers and ``recognizer`` too, its vectors kept under
        ``name`` in ``Face.embeddings`` / ``raw_embeddings`` (a recognizer of no insightface pack: InfiniteYou's
        IR-SE50, ``faceid.faces.irse50.IRSE50_KEY``), run on the same aligned crops. This one is left as it is."""
        if name == self.pack or name in self.extra_recognizers:
            return self
        return FaceAnalyzer(
            self.detector,
            self.recognizer,
            self.det_sizes,
            self.max_detect_side,
            pack=self.pack,
            extra_recognizers={**self.extra_recognizers, name: recognizer},
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike, **kwargs) -> FaceAnalyzer:
        """The models of the folder ``path``: ``from_pretrained(path)``, by a name that says so."""
        return cls.from_pretrained(path, **kwargs)


def _embed(recognizer: Recognizer, aligned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw, L2-normalised) float32 embeddings of aligned crops; a zero vector (broken model) stays zero instead of
    NaN (insightface's ``embedding`` and ``normed_embedding``)."""
    raw = np.asarray(recognizer.embed(aligned), dtype=np.float32)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    return raw, (raw / np.maximum(norms, 1e-12)).astype(np.float32)


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

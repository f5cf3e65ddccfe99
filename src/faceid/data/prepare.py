"""Training data for IP-Adapter-FaceID: prepare a folder of photos once, then stream it to training.

Training pairs every image with its caption and the identity embedding of the face in it (SPEC
section 5); the Plus variants also need the 224x224 aligned face crop for CLIP. Face analysis is by far
the slowest step, so :func:`prepare_dataset` runs it once over a folder of photos and stores the result;
:class:`FaceDataset` then serves training examples from it.

Layout of a prepared dataset folder (``out_dir``)::

    dataset.json                    format, version, images_dir (absolute), settings, counts, status
    manifest.jsonl                  one line per kept image: file_name (relative to images_dir),
                                    caption, shard, row, box, score, face_size, faces
    shards/shard-00000.safetensors  embeddings (N, 512) float32, landmarks (N, 5, 2) float32 and,
                                    with crops, crops_224 (N, 224, 224, 3) uint8 RGB
    skipped.jsonl                   one line per skipped file: file_name, reason, detail
    report.json                     the PrepareReport of the last run

Shard ``k`` holds the kept images among source images ``k * shard_size ... (k + 1) * shard_size - 1``
(sorted by relative path), so a shard has *at most* ``shard_size`` rows. Each shard also records, in its
safetensors metadata, which files it covers and what became of each one; that makes a shard a
self-contained unit of work: it is written atomically (temp file + rename), and an interrupted run
picks up at the first missing shard. Captions are not in the shards: they are read again at the end of
every run, so fixing a caption only needs a quick re-run that reuses every shard.

Captions follow the Hugging Face ``imagefolder`` convention: ``metadata.jsonl`` lines
``{"file_name": "a.jpg", "text": "..."}`` (``"caption"`` is accepted too) or ``metadata.csv`` with
``file_name`` and ``text`` columns, in the folder or any sub-folder (``file_name`` relative to the
metadata file); else a sidecar ``a.txt`` next to ``a.jpg``; else the empty caption.

This module imports neither torch nor the face models at import time (``faceid --help`` stays fast);
``FaceDataset`` is created on first access.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import posixpath
import queue
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from faceid.atomic import atomic_path
from faceid.errors import FaceIDError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    from faceid.faces import FaceAnalyzer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "FaceDataset",  # noqa: F822 - created on first access (module __getattr__)
    "PrepareReport",
    "add_prepare_arguments",
    "find_images",
    "prepare_dataset",
    "read_captions",
    "run_prepare",
]

FORMAT = "faceid-dataset"
FORMAT_VERSION = 1
_SHARD_FORMAT = "faceid-dataset-shard"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

#: Why a file was left out, in the order reports list them.
SKIP_REASONS = ("unreadable", "no_face", "multiple_faces", "face_too_small", "error")
_REASON_WORDS = {
    "unreadable": "unreadable",
    "no_face": "no face",
    "multiple_faces": "several faces",
    "face_too_small": "face too small",
    "error": "analysis error",
}

MULTI_FACE_POLICIES = ("skip", "largest")
CROP_SIZE = 224

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"
REPORT_FILE = "report.json"
SHARDS_DIR = "shards"
_OUR_FILES = (DATASET_FILE, MANIFEST_FILE, SKIPPED_FILE, REPORT_FILE)

# When this many images in a row (from the start) fail with an unexpected error, the analyzer itself is
# broken (bad model, missing library...): stop instead of "skipping" the whole dataset.
_MAX_LEADING_ERRORS = 16


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did. ``skipped`` maps every reason in :data:`SKIP_REASONS` to a count.

    ``no_caption`` counts *kept* images whose caption is empty. ``elapsed`` is this run's wall time in
    seconds; ``reused_shards`` the shards a previous (interrupted or complete) run had already written.
    """

    out_dir: str
    images: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    no_caption: int = 0
    shards: int = 0
    reused_shards: int = 0
    elapsed: float = 0.0

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A short human-readable account, e.g. for the CLI."""
        reused = f", {self.reused_shards} reused" if self.reused_shards else ""
        lines = [
            f"Prepared {self.kept} of {self.images} image(s) into {self.out_dir} "
            f"({self.shards} shard(s){reused}) in {self.elapsed:.1f} s."
        ]
        if self.total_skipped:
            parts = [f"{n} {_REASON_WORDS.get(r, r)}" for r, n in self.skipped.items() if n]
            lines.append(f"Skipped {self.total_skipped}: {', '.join(parts)} (details in {SKIPPED_FILE}).")
        if self.no_caption:
            lines.append(f"{self.no_caption} kept image(s) have no caption (they train with the empty caption).")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Finding images and captions


def find_images(images_dir: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Image files under ``images_dir`` (recursive), as sorted POSIX paths relative to it.

    Matches :data:`IMAGE_EXTENSIONS` case-insensitively; hidden files and folders (``.name``) are ignored,
    and so are the folders in ``exclude`` (e.g. an output folder inside the images folder). Symlinked
    folders are followed (each real folder once).
    """
    root = Path(images_dir)
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or real in excluded:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if (Path(dirpath) / name).is_file():
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def read_captions(images_dir: str | os.PathLike, files: Iterable[str]) -> dict[str, str]:
    """Captions of ``files`` (POSIX paths relative to ``images_dir``); files without one are left out.

    Sources, first match wins: ``metadata.jsonl`` / ``metadata.csv`` entries (in ``images_dir`` or a
    sub-folder; the deepest metadata file that names the image wins), then a ``<image stem>.txt`` sidecar.
    Malformed metadata raises :class:`FaceIDError` naming the file and line.
    """
    root = Path(images_dir)
    files = list(files)
    from_metadata: dict[str, str] = {}
    meta_files = [p for p in root.rglob("metadata.*") if p.name in ("metadata.jsonl", "metadata.csv") and p.is_file()]
    # Shallow first so that deeper (more specific) metadata overrides; jsonl after csv so it wins.
    meta_files.sort(key=lambda p: (len(p.relative_to(root).parts), p.name == "metadata.jsonl", str(p)))
    for meta in meta_files:
        if any(part.startswith(".") for part in meta.relative_to(root).parts[:-1]):
            continue
        base = meta.parent.relative_to(root).as_posix()
        for name, caption in _read_metadata(meta):
            rel = posixpath.normpath(posixpath.join(base, name.replace("\\", "/")))
            from_metadata[rel] = caption
    captions: dict[str, str] = {}
    for rel in files:
        if rel in from_metadata:
            captions[rel] = from_metadata[rel]
            continue
        sidecar = (root / rel).with_suffix(".txt")
        if sidecar.is_file():
            try:
                captions[rel] = sidecar.read_text(encoding="utf-8-sig", errors="replace").strip()
            except OSError as exc:
                raise FaceIDError(f"Cannot read caption file {sidecar}: {exc.strerror or exc}.") from exc
    return captions


def _read_metadata(path: Path) -> list[tuple[str, str]]:
    """(file_name, caption) pairs of one metadata.jsonl / metadata.csv file."""
    hint = 'each entry needs "file_name" and "text" (or "caption")'
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceIDError(f"Cannot read caption metadata {path}: {exc}.") from exc
    out = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FaceIDError(f"{path}:{lineno}: not valid JSON ({exc.msg}); {hint}.") from exc
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                raise FaceIDError(f'{path}:{lineno}: no "file_name"; {hint}.')
            out.append((entry["file_name"], _caption_text(entry)))
        return out
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "file_name" not in reader.fieldnames:
        raise FaceIDError(f'{path}: no "file_name" column (found: {", ".join(reader.fieldnames or [])}); {hint}.')
    for row in reader:
        if row.get("file_name"):
            out.append((row["file_name"], _caption_text(row)))
    return out


def _caption_text(entry: dict) -> str:
    value = entry.get("text", entry.get("caption"))
    if isinstance(value, list):  # several captions per image: the first one
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if value is None:
        return ""
    return str(value).strip()


# ----------------------------------------------------------------------------------------------
# Face analysis of one file


@dataclass
class _Outcome:
    file_name: str
    reason: str | None = None  # None: kept
    detail: str = ""
    embedding: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    crop: np.ndarray | None = None
    box: list[float] | None = None
    score: float = 0.0
    faces: int = 0


def _analyze_file(analyzer, path: Path, rel: str, multi_face: str, min_face_size: int, with_crops: bool) -> _Outcome:
    """Analyze one image and apply the selection rules. Never raises an Exception (BaseException passes)."""
    try:
        faces = analyzer.analyze(path)
    except ImageError as exc:
        return _Outcome(rel, "unreadable", str(exc))
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a long run; it is reported
        return _Outcome(rel, "error", f"{type(exc).__name__}: {exc}".strip())
    if not faces:
        return _Outcome(rel, "no_face", "no face detected")
    widths = [float(f.box[2] - f.box[0]) for f in faces]
    # Faces below the size limit are unusable, so they neither count as a face nor as "several faces"
    # (a small face in the background does not disqualify a portrait).
    usable = [f for f, w in zip(faces, widths, strict=True) if w >= min_face_size]
    if not usable:
        return _Outcome(
            rel,
            "face_too_small",
            f"largest face is {max(widths):.0f} px wide (min_face_size {min_face_size})",
            faces=len(faces),
        )
    if len(usable) > 1 and multi_face == "skip":
        return _Outcome(
            rel, "multiple_faces", f"{len(usable)} faces at least {min_face_size} px wide", faces=len(faces)
        )
    face = max(usable, key=lambda f: f.area)  # analyze() sorts largest first; be explicit anyway
    return _Outcome(
        rel,
        embedding=np.asarray(face.embedding, np.float32),
        landmarks=np.asarray(face.landmarks, np.float32).reshape(5, 2),
        crop=np.asarray(face.crop_224, np.uint8) if with_crops else None,
        box=[round(float(v), 2) for v in face.box],
        score=round(float(face.score), 4),
        faces=len(faces),
    )


# ----------------------------------------------------------------------------------------------
# Files: atomic writes, shards


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.safetensors"


def _write_shard(path: Path, outcomes: list[_Outcome], meta: dict, dim: int, with_crops: bool) -> dict:
    """Write one shard atomically; returns the metadata stored in it (rows and skipped files)."""
    from safetensors.numpy import save

    kept = [o for o in outcomes if o.reason is None]
    emb = np.stack([o.embedding for o in kept]) if kept else np.zeros((0, dim), np.float32)
    lmk = np.stack([o.landmarks for o in kept]) if kept else np.zeros((0, 5, 2), np.float32)
    tensors = {"embeddings": np.ascontiguousarray(emb, np.float32), "landmarks": np.ascontiguousarray(lmk, np.float32)}
    if with_crops:
        crops = np.stack([o.crop for o in kept]) if kept else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        tensors["crops_224"] = np.ascontiguousarray(crops, np.uint8)
    meta = {
        **meta,
        "rows": [
            {"file_name": o.file_name, "box": o.box, "score": o.score, "face_size": _face_size(o.box), "faces": o.faces}
            for o in kept
        ],
        "skipped": [{"file_name": o.file_name, "reason": o.reason, "detail": o.detail} for o in outcomes if o.reason],
    }
    # One metadata key holding sorted JSON: safetensors does not keep the order of several keys, and the
    # bytes of a shard must not depend on the run that wrote it.
    data = save(tensors, metadata={"faceid": json.dumps(meta, sort_keys=True, ensure_ascii=False)})
    _atomic_write(path, data)
    return meta


def _face_size(box: list[float] | None) -> float:
    return round(box[2] - box[0], 1) if box else 0.0


def _read_shard_meta(path: Path) -> dict | None:
    """The metadata of a shard, or None when it is missing, unreadable or inconsistent."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["faceid"])
            n = f.get_slice("embeddings").get_shape()[0]
    except Exception:  # noqa: BLE001 - any damage just means "redo this shard"
        return None
    if meta.get("format") != _SHARD_FORMAT or meta.get("version") != FORMAT_VERSION or len(meta["rows"]) != n:
        return None
    return meta


def _chunk_key(images_dir: Path, files: list[str]) -> str:
    """Identifies a chunk's inputs: names, sizes and modification times of its files."""
    h = hashlib.sha256()
    for rel in files:
        try:
            st = (images_dir / rel).stat()
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel}\t-\n".encode())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# Settings


def _describe_models(analyzer) -> dict:
    """Which face models produced the embeddings (a dataset must not mix embeddings of two models)."""

    def describe(obj) -> dict:
        info: dict[str, Any] = {"type": type(obj).__name__}
        path = getattr(obj, "model_path", None)
        if path:
            info["file"] = Path(path).name
            try:
                info["bytes"] = Path(path).stat().st_size
            except OSError:
                pass
        return info

    recognizer = getattr(analyzer, "recognizer", None)
    return {
        "detector": describe(getattr(analyzer, "detector", None)),
        "recognizer": describe(recognizer),
        "det_sizes": [list(s) for s in getattr(analyzer, "det_sizes", ())],
    }


def _settings_hash(images_dir: str, settings: dict) -> str:
    blob = json.dumps({"images_dir": images_dir, "settings": settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _check_out_dir(out_dir: Path, images_dir: str, settings: dict, overwrite: bool) -> None:
    """Refuse to resume into a folder made with other settings (or that is not a dataset), unless overwrite."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FaceIDError(f"Output path {out_dir} exists and is not a folder.")
    info_path = out_dir / DATASET_FILE
    problem = None
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            info, problem = None, f"its {DATASET_FILE} is unreadable ({exc})"
        if info is not None:
            if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
                problem = f"it holds a dataset of another format ({info.get('format')} v{info.get('version')})"
            elif info.get("images_dir") != images_dir:
                problem = f"it was prepared from another images folder ({info.get('images_dir')})"
            elif info.get("settings") != settings:
                old = info.get("settings") or {}
                diffs = [
                    f"{k}: {_fmt(old.get(k))} -> {_fmt(settings.get(k))}"
                    for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)
                ]
                problem = f"it was prepared with other settings ({'; '.join(diffs)})"
    elif any(out_dir.iterdir()):
        problem = "it is not empty and holds no faceid dataset"
    if problem is None:
        return
    if not overwrite:
        raise FaceIDError(
            f"Cannot prepare into {out_dir}: {problem}. Choose another output folder, re-run with the same "
            "settings to resume, or pass --overwrite (overwrite=True) to rebuild it from scratch."
        )
    _remove_dataset_files(out_dir)


def _fmt(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def _remove_dataset_files(out_dir: Path) -> None:
    """Delete what prepare_dataset writes (and nothing else) from ``out_dir``."""
    for name in _OUR_FILES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    for tmp in out_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# prepare_dataset


def prepare_dataset(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    analyzer_factory: Callable[[], FaceAnalyzer],
    *,
    multi_face: str = "skip",
    min_face_size: int = 64,
    with_crops: bool = False,
    workers: int = 2,
    shard_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareReport:
    """Detect and embed the face of every image under ``images_dir`` and store a training dataset in ``out_dir``.

    ``analyzer_factory()`` builds a :class:`~faceid.faces.FaceAnalyzer` (e.g.
    ``functools.partial(FaceAnalyzer.from_dir, "models/buffalo_l")``); it is called once per worker, in
    the calling thread, one after the other. ``workers`` threads analyze images in parallel, each with its
    own analyzer (the detectors and onnxruntime release the GIL while they compute).

    Kept: images with exactly one face at least ``min_face_size`` px wide (box width), or, with
    ``multi_face="largest"``, the largest of several. Skipped (listed with the reason in ``skipped.jsonl``,
    never an exception): unreadable, corrupt or non-image files, no face, several faces
    (``multi_face="skip"``), only faces smaller than ``min_face_size``, and unexpected analysis errors.

    Re-running the same call resumes an interrupted run: finished shards are kept, and the result is the
    same as one uninterrupted run. Changing a setting that affects the result (``multi_face``,
    ``min_face_size``, ``with_crops``, ``shard_size``, the face models or ``images_dir``) is refused with a
    :class:`FaceIDError` unless ``overwrite=True``, which rebuilds the dataset. ``workers`` and ``progress``
    may change freely.
    """
    started = time.perf_counter()
    if multi_face not in MULTI_FACE_POLICIES:
        raise ValueError(f"multi_face must be one of {MULTI_FACE_POLICIES}, got {multi_face!r}")
    for name, value, least in (
        ("min_face_size", min_face_size, 0),
        ("workers", workers, 1),
        ("shard_size", shard_size, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    src = Path(images_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if not src.is_dir():
        raise FaceIDError(f"Images folder not found: {src}.")
    if out == src:
        raise FaceIDError("The output folder must differ from the images folder.")
    files = find_images(src, exclude=[out])
    if not files:
        raise FaceIDError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {src} or its sub-folders.")
    captions = read_captions(src, files)  # malformed metadata fails now, not after hours of analysis

    analyzers = [analyzer_factory()]
    dim = int(getattr(getattr(analyzers[0], "recognizer", None), "dim", 0) or 512)
    settings = {
        "multi_face": multi_face,
        "min_face_size": int(min_face_size),
        "with_crops": bool(with_crops),
        "shard_size": int(shard_size),
        "embedding_dim": dim,
        "face_models": _describe_models(analyzers[0]),
    }
    _check_out_dir(out, str(src), settings, overwrite)
    shards_dir = out / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    for tmp in [*out.glob(".*.tmp-*"), *shards_dir.glob(".*.tmp-*")]:  # left by a killed run
        tmp.unlink(missing_ok=True)
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "status": "incomplete",
        "images_dir": str(src),
        "settings": settings,
        "counts": None,
    }
    _atomic_write(out / DATASET_FILE, _json_bytes(info))

    # Work plan: chunk k of the sorted file list -> shard k. Reuse every shard whose inputs and settings match.
    chunks = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    settings_id = _settings_hash(str(src), settings)
    shard_metas: dict[int, dict] = {}
    todo: list[int] = []
    keys: dict[int, str] = {}
    for k, chunk in enumerate(chunks):
        keys[k] = _chunk_key(src, chunk)
        meta = _read_shard_meta(out / _shard_name(k))
        usable = (
            meta is not None
            and meta.get("shard") == k
            and meta.get("key") == keys[k]
            and meta.get("settings") == settings_id
            # Unexpected errors may be transient (memory, a flaky disk): retry those shards.
            and not any(s["reason"] == "error" for s in meta["skipped"])
        )
        if usable:
            shard_metas[k] = meta
        else:
            todo.append(k)
    expected = {Path(_shard_name(k)).name for k in range(len(chunks))}
    for stale in shards_dir.glob("shard-*.safetensors"):  # from an earlier run over more files
        if stale.name not in expected:
            stale.unlink()
    reused = len(shard_metas)

    if todo:
        while len(analyzers) < min(workers, sum(len(chunks[k]) for k in todo)):
            analyzers.append(analyzer_factory())
        _run_chunks(
            src,
            out,
            chunks,
            todo,
            keys,
            settings_id,
            analyzers,
            shard_metas,
            dim=dim,
            multi_face=multi_face,
            min_face_size=min_face_size,
            with_crops=with_crops,
            progress=progress,
            done_images=sum(len(chunks[k]) for k in shard_metas),
            total_images=len(files),
        )

    # Assemble the manifest, the skip list and the report from all shards (captions read fresh).
    manifest, skipped = [], []
    for k in range(len(chunks)):
        meta = shard_metas[k]
        for row_index, row in enumerate(meta["rows"]):
            manifest.append(
                {
                    "file_name": row["file_name"],
                    "caption": captions.get(row["file_name"], ""),
                    "shard": _shard_name(k),
                    "row": row_index,
                    "box": row["box"],
                    "score": row["score"],
                    "face_size": row["face_size"],
                    "faces": row["faces"],
                }
            )
        skipped.extend(
            {"file_name": s["file_name"], "reason": s["reason"], "detail": s["detail"]} for s in meta["skipped"]
        )
    counts = {r: 0 for r in SKIP_REASONS}
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    report = PrepareReport(
        out_dir=str(out),
        images=len(files),
        kept=len(manifest),
        skipped=counts,
        no_caption=sum(1 for m in manifest if not m["caption"]),
        shards=len(chunks),
        reused_shards=reused,
    )
    _atomic_write(out / MANIFEST_FILE, _jsonl_bytes(manifest))
    _atomic_write(out / SKIPPED_FILE, _jsonl_bytes(skipped))
    info["status"] = "complete"
    info["counts"] = {
        "images": report.images,
        "kept": report.kept,
        "skipped": counts,
        "no_caption": report.no_caption,
        "shards": report.shards,
    }
    report.elapsed = round(time.perf_counter() - started, 3)
    _atomic_write(out / REPORT_FILE, _json_bytes(report.to_dict()))
    _atomic_write(out / DATASET_FILE, _json_bytes(info))  # last: marks the dataset complete
    return report


def _run_chunks(
    src: Path,
    out: Path,
    chunks: list[list[str]],
    todo: list[int],
    keys: dict[int, str],
    settings_id: str,
    analyzers: list,
    shard_metas: dict[int, dict],
    *,
    dim: int,
    multi_face: str,
    min_face_size: int,
    with_crops: bool,
    progress: bool,
    done_images: int,
    total_images: int,
) -> None:
    """Analyze the chunks in ``todo`` with a thread per analyzer; write each shard as soon as it is complete.

    Results are consumed in file order with a bounded look-ahead, so shards are written in order and
    memory stays bounded whatever the dataset size.
    """
    from tqdm.auto import tqdm

    pool: queue.Queue = queue.Queue()
    for analyzer in analyzers:
        pool.put(analyzer)

    def task(rel: str) -> _Outcome:
        analyzer = pool.get()
        try:
            return _analyze_file(analyzer, src / rel, rel, multi_face, min_face_size, with_crops)
        finally:
            pool.put(analyzer)

    jobs = iter([(k, rel) for k in todo for rel in chunks[k]])
    window = 4 * len(analyzers)
    inflight: deque = deque()
    buffers: dict[int, list[_Outcome]] = {}
    processed = errors = kept = 0
    bar = tqdm(total=total_images, initial=done_images, unit="img", desc="Analyzing faces", disable=not progress)
    executor = ThreadPoolExecutor(max_workers=len(analyzers), thread_name_prefix="faceid-prepare")
    try:

        def fill() -> None:
            while len(inflight) < window:
                job = next(jobs, None)
                if job is None:
                    return
                inflight.append((job[0], executor.submit(task, job[1])))

        fill()
        while inflight:
            k, future = inflight.popleft()
            outcome = future.result()
            fill()
            processed += 1
            kept += outcome.reason is None
            errors += outcome.reason == "error"
            if errors == processed and processed >= min(_MAX_LEADING_ERRORS, total_images - done_images):
                raise FaceIDError(
                    f"Face analysis fails on every image (the first, {outcome.file_name}: {outcome.detail}); "
                    "check the face models."
                )
            buffers.setdefault(k, []).append(outcome)
            bar.update(1)
            bar.set_postfix(kept=kept, skipped=processed - kept, refresh=False)
            if len(buffers[k]) == len(chunks[k]):
                meta = {"format": _SHARD_FORMAT, "version": FORMAT_VERSION, "shard": k, "key": keys[k]}
                meta["settings"] = settings_id
                shard_metas[k] = _write_shard(out / _shard_name(k), buffers.pop(k), meta, dim, with_crops)
    finally:
        # On an interruption: drop queued images, let running ones finish (one image each), keep written shards.
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()


# ----------------------------------------------------------------------------------------------
# Reading a prepared dataset


def read_dataset_info(dataset_dir: str | os.PathLike) -> dict:
    """The ``dataset.json`` of a complete prepared dataset; :class:`FaceIDError` for anything else."""
    root = Path(dataset_dir).expanduser()
    how = "Prepare one with `faceid prepare IMAGES_DIR --out DIR`."
    if not root.is_dir():
        raise FaceIDError(f"Dataset folder not found: {root}. {how}")
    path = root / DATASET_FILE
    if not path.is_file():
        raise FaceIDError(f"{root} is not a prepared faceid dataset (no {DATASET_FILE}). {how}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FaceIDError(f"Cannot read {path}: {exc}. Re-run the prepare command.") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise FaceIDError(f"{path} does not describe a faceid dataset. {how}")
    if info.get("version") != FORMAT_VERSION:
        raise FaceIDError(
            f"{root} is a faceid dataset of format version {info.get('version')}, but this faceid reads "
            f"version {FORMAT_VERSION}. Prepare the dataset again with this faceid version."
        )
    if info.get("status") != "complete":
        raise FaceIDError(
            f"The dataset in {root} is incomplete (its preparation was interrupted); run the same prepare "
            "command again to finish it."
        )
    return info


class _FaceDatasetImpl:
    """Training examples of a dataset made by :func:`prepare_dataset` (a ``torch.utils.data.Dataset``).

    Each item is a dict:

    * ``pixel_values``: float32 (3, R, R) in [-1, 1]: the image, shorter side resized to ``resolution``
      (bicubic, antialiased), center-cropped to R x R;
    * ``caption``: str (may be empty);
    * ``id_embedding``: float32 (512,), the L2-normalised face embedding;
    * ``clip_image`` (``with_crops=True`` only): uint8 (224, 224, 3) RGB aligned face crop for CLIP.

    ``hflip=True`` mirrors the image (and the face crop) with probability 1/2; the identity embedding is
    kept (identity does not change in a mirror). ``images_dir`` overrides where the images are read from
    (default: the folder the dataset was prepared from). Shards are opened lazily, per process, so the
    dataset works with ``DataLoader(num_workers=...)``.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        resolution: int = 512,
        with_crops: bool = False,
        hflip: bool = False,
        images_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(dataset_dir).expanduser().resolve()
        self.info = read_dataset_info(self.root)
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.with_crops = bool(with_crops)
        self.hflip = bool(hflip)
        if self.with_crops and not self.info["settings"].get("with_crops"):
            raise FaceIDError(
                f"The dataset in {self.root} was prepared without face crops, which with_crops needs (Plus "
                "variants): prepare it again with --with-crops."
            )
        self.images_dir = Path(images_dir).expanduser() if images_dir is not None else Path(self.info["images_dir"])
        manifest = self.root / MANIFEST_FILE
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as exc:
            raise FaceIDError(f"Cannot read {manifest}: {exc}. Re-run the prepare command.") from exc
        missing = sorted({r["shard"] for r in self.records if not (self.root / r["shard"]).is_file()})
        if missing:
            raise FaceIDError(f"The dataset in {self.root} lacks {', '.join(missing)}; re-run the prepare command.")
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        from faceid.images import load_image

        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        rec = self.records[index]
        image = _resize_center_crop(load_image(self.images_dir / rec["file_name"]), self.resolution)
        pixels = np.asarray(image, dtype=np.uint8)
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        if flip:
            pixels = pixels[:, ::-1]
        pixel_values = torch.from_numpy(np.ascontiguousarray(pixels).transpose(2, 0, 1).copy()).float() / 127.5 - 1.0
        item: dict[str, Any] = {
            "pixel_values": pixel_values,
            "caption": rec["caption"],
            "id_embedding": torch.from_numpy(self._row("embeddings", rec).astype(np.float32)),
        }
        if self.with_crops:
            crop = self._row("crops_224", rec)
            if flip:
                crop = crop[:, ::-1]
            item["clip_image"] = torch.from_numpy(np.ascontiguousarray(crop))
        return item

    def _row(self, tensor: str, rec: dict) -> np.ndarray:
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(rec["shard"])
        if handle is None:
            handle = safe_open(str(self.root / rec["shard"]), framework="numpy")
            self._handles[rec["shard"]] = handle
        return np.array(handle.get_slice(tensor)[int(rec["row"])])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not pickle (spawned DataLoader workers reopen them)
        return state


def _resize_center_crop(image, size: int):
    """Resize so the shorter side is ``size`` (bicubic, antialiased by PIL), then crop the center square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _face_dataset_class() -> type:
    import torch.utils.data

    class FaceDataset(_FaceDatasetImpl, torch.utils.data.Dataset):
        __doc__ = _FaceDatasetImpl.__doc__

    FaceDataset.__module__ = __name__
    FaceDataset.__qualname__ = "FaceDataset"  # pickled by reference, found again via __getattr__
    return FaceDataset


def __getattr__(name: str):
    # FaceDataset subclasses torch's Dataset; build it on first use so importing this module (and the
    # CLI, which imports it for its arguments) does not pay for importing torch.
    if name == "FaceDataset":
        cls = _face_dataset_class()
        globals()["FaceDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Command line (wired into `faceid prepare` by faceid.cli)


def _int_at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``faceid prepare`` options to ``parser`` (a sub-command parser); returns it."""
    parser.add_argument("images_dir", help="folder of training photos (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the prepared dataset (created; resumes if present)")
    parser.add_argument("--face-models", default=None, help="folder with the face detector and recognizer (buffalo_l)")
    parser.add_argument(
        "--multi-face",
        choices=MULTI_FACE_POLICIES,
        default="skip",
        help="photos with several faces: skip them, or keep the largest face (default: skip)",
    )
    parser.add_argument(
        "--min-face-size",
        type=_int_at_least(0),
        default=64,
        help="skip faces narrower than this many pixels (default 64)",
    )
    parser.add_argument(
        "--with-crops", action="store_true", help="also store the 224x224 aligned face crops (needed for Plus)"
    )
    parser.add_argument("--workers", type=_int_at_least(1), default=2, help="parallel face analyzers (default 2)")
    parser.add_argument(
        "--shard-size", type=_int_at_least(1), default=256, help="source images per shard file (default 256)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild the output folder even if it was prepared with other settings"
    )
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``faceid prepare`` with parsed arguments; prints the summary. Returns the exit status."""
    import functools
    import sys

    from faceid.faces import FaceAnalyzer

    if args.face_models:
        factory = functools.partial(FaceAnalyzer.from_dir, args.face_models)
    else:
        factory = FaceAnalyzer.from_pretrained
    report = prepare_dataset(
        args.images_dir,
        args.out,
        factory,
        multi_face=args.multi_face,
        min_face_size=args.min_face_size,
        with_crops=args.with_crops,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=not getattr(args, "quiet", False),
        overwrite=args.overwrite,
    )
    print(report.summary())
    if report.kept == 0:
        print(
            f"faceid: error: no image was kept; see {Path(report.out_dir) / SKIPPED_FILE} for the reasons.",
            file=sys.stderr,
        )
        return 2
    return 0

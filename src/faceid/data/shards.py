"""The files of a prepared dataset, and the shards that hold its faces.

Layout of a prepared dataset folder::

    dataset.json                    format, version, images_dir (absolute), settings, counts, status
    manifest.jsonl                  one line per kept image: file_name (relative to images_dir),
                                    caption, shard, row, box, score, face_size, faces
    shards/shard-00000.safetensors  embeddings (N, 512) float32, landmarks (N, 5, 2) float32 and,
                                    with crops, crops_224 (N, 224, 224, 3) uint8 RGB
    skipped.jsonl                   one line per skipped file: file_name, reason, detail
    report.json                     the PrepareReport of the last run

Shard ``k`` holds the kept images among source images ``k * shard_size ... (k + 1) * shard_size - 1``
(sorted by relative path), so a shard has *at most* ``shard_size`` rows. Each shard also records, in its
safetensors metadata, which files it covers and what became of each one (a :class:`FileOutcome`); that
makes a shard a self-contained unit of work: it is written atomically, and an interrupted run picks up
at the first missing shard. Captions are not in the shards: they are read again at the end of every
run, so fixing a caption only needs a quick re-run that reuses every shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import FaceIDError

__all__ = [
    "CROP_SIZE",
    "DATASET_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "REPORT_FILE",
    "SHARDS_DIR",
    "SHARD_FORMAT",
    "SKIPPED_FILE",
    "FileOutcome",
    "read_dataset_info",
    "read_shard_meta",
    "shard_name",
    "write_shard",
]

FORMAT = "faceid-dataset"
FORMAT_VERSION = 1
SHARD_FORMAT = "faceid-dataset-shard"
CROP_SIZE = 224

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
SKIPPED_FILE = "skipped.jsonl"
REPORT_FILE = "report.json"
SHARDS_DIR = "shards"


@dataclass
class FileOutcome:
    """What became of one source image: kept (``reason`` None) with its face, or skipped and why."""

    file_name: str
    reason: str | None = None  # None: kept; else one of prepare's SKIP_REASONS
    detail: str = ""
    embedding: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    crop: np.ndarray | None = None
    box: list[float] | None = None
    score: float = 0.0
    faces: int = 0


def shard_name(index: int) -> str:
    return f"{SHARDS_DIR}/shard-{index:05d}.safetensors"


def write_shard(path: Path, outcomes: list[FileOutcome], meta: dict, dim: int, with_crops: bool) -> dict:
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
    atomic_write(path, data)
    return meta


def _face_size(box: list[float] | None) -> float:
    return round(box[2] - box[0], 1) if box else 0.0


def read_shard_meta(path: Path) -> dict | None:
    """The metadata of a shard, or None when it is missing, unreadable or inconsistent."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["faceid"])
            n = f.get_slice("embeddings").get_shape()[0]
    except Exception:  # noqa: BLE001 - any damage just means "redo this shard"
        return None
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != FORMAT_VERSION or len(meta["rows"]) != n:
        return None
    return meta


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

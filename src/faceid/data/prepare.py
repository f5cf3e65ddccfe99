"""``prepare_dataset``: detect and embed the face of every photo of a folder once, and store the result as a
dataset (:mod:`faceid.data.shards` describes its files); resumable, in parallel (threads, or Ray Data actors with
``ray=``: the same per-photo function and the same shard writer), every skipped file listed with the reason."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_write
from ..errors import FaceIDError, ImageError
from ..images import IMAGE_SUFFIXES
from .captions import find_images, read_captions
from .shards import (
    DATASET_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    REPORT_FILE,
    SHARD_FORMAT,
    SHARDS_DIR,
    SKIPPED_FILE,
    FileOutcome,
    read_shard_meta,
    shard_name,
    write_shard,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..faces import FaceAnalyzer
    from ..ray_data import RayWorkers

__all__ = ["MULTI_FACE_POLICIES", "SKIP_REASONS", "PrepareReport", "prepare_dataset"]

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
# Face analysis of one file


def _analyze_file(analyzer, path: Path, rel: str, multi_face: str, min_face_size: int, with_crops: bool) -> FileOutcome:
    """Analyze one image and apply the selection rules. Never raises an Exception (BaseException passes)."""
    try:
        faces = analyzer.analyze(path)
    except ImageError as exc:
        return FileOutcome(rel, "unreadable", str(exc))
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a long run; it is reported
        return FileOutcome(rel, "error", f"{type(exc).__name__}: {exc}".strip())
    if not faces:
        return FileOutcome(rel, "no_face", "no face detected")
    widths = [float(f.box[2] - f.box[0]) for f in faces]
    # Faces below the size limit are unusable, so they neither count as a face nor as "several faces"
    # (a small face in the background does not disqualify a portrait).
    usable = [f for f, w in zip(faces, widths, strict=True) if w >= min_face_size]
    if not usable:
        return FileOutcome(
            rel,
            "face_too_small",
            f"largest face is {max(widths):.0f} px wide (min_face_size {min_face_size})",
            faces=len(faces),
        )
    if len(usable) > 1 and multi_face == "skip":
        return FileOutcome(
            rel, "multiple_faces", f"{len(usable)} faces at least {min_face_size} px wide", faces=len(faces)
        )
    face = max(usable, key=lambda f: f.area)  # analyze() sorts largest first; be explicit anyway
    return FileOutcome(
        rel,
        embedding=np.asarray(face.embedding, np.float32),
        landmarks=np.asarray(face.landmarks, np.float32).reshape(5, 2),
        crop=np.asarray(face.crop_224, np.uint8) if with_crops else None,
        box=[round(float(v), 2) for v in face.box],
        score=round(float(face.score), 4),
        faces=len(faces),
    )


# ----------------------------------------------------------------------------------------------
# Files of the dataset and its inputs


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _jsonl_bytes(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


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
    ray: RayWorkers | None = None,
) -> PrepareReport:
    """Detect and embed the face of every image under ``images_dir`` and store a training dataset in ``out_dir``.

    ``analyzer_factory()`` builds a :class:`~faceid.faces.FaceAnalyzer` (e.g.
    ``functools.partial(FaceAnalyzer.from_pretrained, "models/buffalo_l")``); it is called once per worker, in
    the calling thread, one after the other. ``workers`` threads analyze images in parallel, each with its
    own analyzer (the detectors and onnxruntime release the GIL while they compute).

    Kept: images with exactly one face at least ``min_face_size`` px wide (box width), or, with
    ``multi_face="largest"``, the largest of several. Skipped (listed with the reason in ``skipped.jsonl``,
    never an exception): unreadable, corrupt or non-image files, no face, several faces
    (``multi_face="skip"``), only faces smaller than ``min_face_size``, and unexpected analysis errors.

    Re-running the same call resumes an interrupted run: finished shards are kept, and the result is the
    same as one uninterrupted run. Changing a setting that affects the result (``multi_face``,
    ``min_face_size``, ``with_crops``, ``shard_size``, the face models or ``images_dir``) is refused with a
    :class:`FaceIDError` unless ``overwrite=True``, which rebuilds the dataset. ``workers``, ``progress`` and
    ``ray`` may change freely.

    ``ray`` (a :class:`~faceid.ray_data.RayWorkers`): the per-photo work runs as a Ray Data pipeline instead of
    threads, on ``ray.workers`` actors that each call ``analyzer_factory()`` once (so it must pickle:
    ``functools.partial`` of a loader and paths); ``workers`` is then unused. Shards are written here, as they
    complete, and are the same as without Ray; the photos, the face models and ``out_dir`` must be at the same
    paths on every machine of a cluster.
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
        raise FaceIDError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in {src} or its sub-folders.")
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
    atomic_write(out / DATASET_FILE, _json_bytes(info))

    # Work plan: chunk k of the sorted file list -> shard k. Reuse every shard whose inputs and settings match.
    chunks = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    settings_id = _settings_hash(str(src), settings)
    shard_metas: dict[int, dict] = {}
    todo: list[int] = []
    keys: dict[int, str] = {}
    for k, chunk in enumerate(chunks):
        keys[k] = _chunk_key(src, chunk)
        meta = read_shard_meta(out / shard_name(k))
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
    expected = {Path(shard_name(k)).name for k in range(len(chunks))}
    for stale in shards_dir.glob("shard-*.safetensors"):  # from an earlier run over more files
        if stale.name not in expected:
            stale.unlink()
    reused = len(shard_metas)

    if todo:
        jobs = [(k, rel) for k in todo for rel in chunks[k]]
        rules = {"multi_face": multi_face, "min_face_size": min_face_size, "with_crops": with_crops}
        if ray is None:
            while len(analyzers) < min(workers, len(jobs)):
                analyzers.append(analyzer_factory())
            outcomes = _analyze_in_threads(src, jobs, analyzers, rules)
        else:
            outcomes = _analyze_on_ray(src, jobs, analyzer_factory, rules, ray)
        _write_shards(
            outcomes,
            out,
            chunks,
            keys,
            settings_id,
            shard_metas,
            dim=dim,
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
                    "shard": shard_name(k),
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
    atomic_write(out / MANIFEST_FILE, _jsonl_bytes(manifest))
    atomic_write(out / SKIPPED_FILE, _jsonl_bytes(skipped))
    info["status"] = "complete"
    info["counts"] = {
        "images": report.images,
        "kept": report.kept,
        "skipped": counts,
        "no_caption": report.no_caption,
        "shards": report.shards,
    }
    report.elapsed = round(time.perf_counter() - started, 3)
    atomic_write(out / REPORT_FILE, _json_bytes(report.to_dict()))
    atomic_write(out / DATASET_FILE, _json_bytes(info))  # last: marks the dataset complete
    return report


def _analyze_in_threads(
    src: Path, jobs: list[tuple[int, str]], analyzers: list, rules: dict[str, Any]
) -> Iterator[tuple[int, FileOutcome]]:
    """``(chunk, outcome)`` of every job, in order, from a thread per analyzer (the detectors and onnxruntime
    release the GIL while they compute), with a bounded look-ahead so that memory stays bounded."""
    pool: queue.Queue = queue.Queue()
    for analyzer in analyzers:
        pool.put(analyzer)

    def task(rel: str) -> FileOutcome:
        analyzer = pool.get()
        try:
            return _analyze_file(analyzer, src / rel, rel, **rules)
        finally:
            pool.put(analyzer)

    pending = iter(jobs)
    window = 4 * len(analyzers)
    inflight: deque = deque()
    executor = ThreadPoolExecutor(max_workers=len(analyzers), thread_name_prefix="faceid-prepare")
    try:

        def fill() -> None:
            while len(inflight) < window:
                job = next(pending, None)
                if job is None:
                    return
                inflight.append((job[0], executor.submit(task, job[1])))

        fill()
        while inflight:
            k, future = inflight.popleft()
            outcome = future.result()
            fill()
            yield k, outcome
    finally:
        # On an interruption: drop queued images, let running ones finish (one image each), keep written shards.
        executor.shutdown(wait=True, cancel_futures=True)


def _load_analyzer(factory: Callable[[], FaceAnalyzer]) -> FaceAnalyzer:
    """A Ray actor's state: its own analyzer, built once."""
    return factory()


def _analyze_files(src: Path, rules: dict[str, Any], analyzer, jobs: list[tuple[int, str]]) -> list[FileOutcome]:
    """A Ray actor's batch: the same per-photo function as the threads run."""
    return [_analyze_file(analyzer, src / rel, rel, **rules) for _, rel in jobs]


def _analyze_on_ray(
    src: Path, jobs: list[tuple[int, str]], factory: Callable[[], FaceAnalyzer], rules: dict[str, Any], ray: RayWorkers
) -> Iterator[tuple[int, FileOutcome]]:
    """``(chunk, outcome)`` of every job from a Ray Data pipeline of actors that each hold an analyzer; in the
    order batches finish."""
    from ..ray_data import map_on_actors

    setup = functools.partial(_load_analyzer, factory)
    work = functools.partial(_analyze_files, src, rules)
    for index, outcome in map_on_actors(jobs, setup, work, ray, batch_size=(16, 64)):
        yield jobs[index][0], outcome


def _write_shards(
    outcomes: Iterable[tuple[int, FileOutcome]],
    out: Path,
    chunks: list[list[str]],
    keys: dict[int, str],
    settings_id: str,
    shard_metas: dict[int, dict],
    *,
    dim: int,
    with_crops: bool,
    progress: bool,
    done_images: int,
    total_images: int,
) -> None:
    """Write each shard as soon as all its images are analysed (its rows in file order, whatever order they
    came in), with a progress bar over the finished images; stop when analysis fails on every image."""
    from tqdm.auto import tqdm

    buffers: dict[int, list[FileOutcome]] = {}
    processed = errors = kept = 0
    bar = tqdm(total=total_images, initial=done_images, unit="img", desc="Analyzing faces", disable=not progress)
    try:
        for k, outcome in outcomes:
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
                order = {rel: i for i, rel in enumerate(chunks[k])}
                rows = sorted(buffers.pop(k), key=lambda o: order[o.file_name])
                meta = {"format": SHARD_FORMAT, "version": FORMAT_VERSION, "shard": k, "key": keys[k]}
                meta["settings"] = settings_id
                shard_metas[k] = write_shard(out / shard_name(k), rows, meta, dim, with_crops)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:  # a generator: its threads or its Ray pipeline stop now
            close()
        bar.close()

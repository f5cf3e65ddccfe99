"""Which photos a dataset is made of, and their captions.

Captions follow the Hugging Face ``imagefolder`` convention: ``metadata.jsonl`` lines
``{"file_name": "a.jpg", "text": "..."}`` (``"caption"`` is accepted too) or ``metadata.csv`` with
``file_name`` and ``text`` columns, in the folder or any sub-folder (``file_name`` relative to the
metadata file); else a sidecar ``a.txt`` next to ``a.jpg``; else the empty caption.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from ..errors import FaceIDError
from ..images import IMAGE_SUFFIXES

__all__ = ["find_images", "read_captions"]


def find_images(images_dir: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Image files under ``images_dir`` (recursive), as sorted POSIX paths relative to it.

    Matches :data:`faceid.images.IMAGE_SUFFIXES` case-insensitively; hidden files and folders (``.name``) are ignored,
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
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
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

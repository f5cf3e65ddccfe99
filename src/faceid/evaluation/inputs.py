"""What an evaluation runs over: the identities (one photo each), the prompts, the seeds, the adapter scales,
and the images of a folder to score."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import FaceIDError
from ..images import IMAGE_SUFFIXES

__all__ = [
    "DEFAULT_NUM_SEEDS",
    "DEFAULT_SCALES",
    "default_prompts_path",
    "list_identities",
    "list_images",
    "load_prompts",
    "parse_scales",
    "parse_seeds",
]

DEFAULT_SCALES = (0.4, 0.7, 1.0)
DEFAULT_NUM_SEEDS = 4


def default_prompts_path() -> Path:
    """The prompt list shipped with faceid (``faceid/prompts/eval_prompts.txt``)."""
    return Path(str(resources.files("faceid") / "prompts" / "eval_prompts.txt"))


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """Prompts from a text file, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path).expanduser() if path is not None else default_prompts_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FaceIDError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FaceIDError(f"cannot read the prompt file {path}: {exc}") from exc
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise FaceIDError(f"the prompt file {path} has no prompts (one per line; '#' starts a comment)")
    return prompts


def list_identities(faces_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(identity, photo)`` for every image in ``faces_dir`` (not recursive), sorted; identity = file stem."""
    folder = Path(faces_dir).expanduser()
    if not folder.is_dir():
        raise FaceIDError(f"faces folder not found: {folder} (give a folder with one photo per person)")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    photos = [p for p in photos if not p.name.startswith(".")]
    if not photos:
        raise FaceIDError(f"no photos in {folder} (expected {', '.join(IMAGE_SUFFIXES)} files, one per person)")
    seen: dict[str, Path] = {}
    for photo in photos:
        if photo.stem in seen:
            raise FaceIDError(
                f"two photos name the same identity {photo.stem!r}: {seen[photo.stem].name}, {photo.name}"
            )
        seen[photo.stem] = photo
    return [(p.stem, p) for p in photos]


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"4"`` -> seeds 0..3; ``"1,5,9"`` -> those seeds; a list stays a list."""
    if isinstance(text, int):
        values = list(range(text))
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = list(range(int(parts[0]))) if len(parts) == 1 else [int(p) for p in parts]
        except (ValueError, IndexError):
            raise FaceIDError(f"--seeds takes a count (4) or a comma-separated list (1,5,9), got {text!r}") from None
    else:
        values = [int(s) for s in text]
    if not values or any(s < 0 for s in values):
        raise FaceIDError(f"--seeds needs at least one seed, all >= 0 (got {text!r})")
    if len(set(values)) != len(values):
        raise FaceIDError(f"--seeds has repeated seeds: {text!r}")
    return values


def parse_scales(text: str | Sequence[float]) -> list[float]:
    """``"0.4,0.7,1.0"`` -> [0.4, 0.7, 1.0]."""
    try:
        values = [float(p) for p in text.split(",") if p.strip()] if isinstance(text, str) else [float(s) for s in text]
    except ValueError:
        raise FaceIDError(f"--scales takes comma-separated numbers such as 0.4,0.7,1.0, got {text!r}") from None
    if not values or any(not math.isfinite(s) or s < 0 for s in values):
        raise FaceIDError(f"--scales needs at least one finite scale >= 0 (got {text!r})")
    if len(set(values)) != len(values):
        raise FaceIDError(f"--scales has repeated values: {text!r}")
    return values


def list_images(images_dir: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``images_dir``, sorted; hidden files and faceid's contact sheets are left out."""
    folder = Path(images_dir).expanduser()
    if not folder.is_dir():
        raise FaceIDError(f"images folder not found: {folder}")
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(
        p
        for p in found
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith((".", "contact_sheet"))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])
    )
    if not images:
        raise FaceIDError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return images

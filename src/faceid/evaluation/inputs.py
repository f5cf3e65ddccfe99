"""What an evaluation runs over: the identities (one photo each), the groups of them pictured together, the
prompts, the seeds, the adapter scales, and the images of a folder to score."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import FaceIDError
from ..images import IMAGE_SUFFIXES

__all__ = [
    "DEFAULT_NUM_SEEDS",
    "DEFAULT_SCALES",
    "EvalGroup",
    "default_prompts_path",
    "list_identities",
    "list_images",
    "load_prompts",
    "parse_group",
    "parse_scales",
    "resolve_groups",
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


@dataclass(frozen=True)
class EvalGroup:
    """Several identities of the faces folder in one picture: a case of the evaluation grid of its own.

    ``people``: identity names (file stems), person k in region k. ``regions``: where each goes, as the
    pipeline takes it: ``"auto"`` (equal columns, left to right) or one box ``(x0, y0, x1, y1)`` in
    fractions per person. The images go to ``images/scale_<s>/<name>/``, ``name`` being the people
    joined by ``+``.
    """

    people: tuple[str, ...]
    regions: str | tuple[tuple[float, float, float, float], ...] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "people", tuple(str(p) for p in self.people))
        if not isinstance(self.regions, str):
            object.__setattr__(self, "regions", tuple(tuple(float(v) for v in box) for box in self.regions))
        if len(self.people) < 2:
            raise FaceIDError(f"a group pictures two people or more, got {list(self.people)}")
        if len(set(self.people)) != len(self.people):
            raise FaceIDError(f"a group names the same person twice: {'+'.join(self.people)}")
        if isinstance(self.regions, str) and self.regions != "auto":
            raise FaceIDError(f"a group's regions are 'auto' or one box per person, got {self.regions!r}")
        if not isinstance(self.regions, str) and len(self.regions) != len(self.people):
            raise FaceIDError(f"{len(self.regions)} regions for the {len(self.people)} people of {self.name}")

    @property
    def name(self) -> str:
        return "+".join(self.people)


def parse_group(text: str | EvalGroup | Sequence[str]) -> EvalGroup:
    """``"obama,biden"`` (``--group``) -> the two in one picture, left to right, regions ``"auto"``."""
    if isinstance(text, EvalGroup):
        return text
    names = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    if len(names) < 2:
        raise FaceIDError(f"--group takes two identities or more, comma-separated (obama,biden), got {text!r}")
    return EvalGroup(tuple(names))


def resolve_groups(groups: Sequence[EvalGroup | str | Sequence[str]], identities: Sequence[str]) -> list[EvalGroup]:
    """The groups, each naming only ``identities`` (those of the faces folder), no two alike."""
    resolved: list[EvalGroup] = []
    for group in (parse_group(g) for g in groups):
        unknown = [p for p in group.people if p not in identities]
        if unknown:
            raise FaceIDError(
                f"group {group.name}: no photo of {', '.join(unknown)} in the faces folder "
                f"(its identities: {', '.join(identities)})"
            )
        if group.name in identities or any(g.name == group.name for g in resolved):
            raise FaceIDError(f"the group {group.name} is given twice, or clashes with a photo of that name")
        resolved.append(group)
    return resolved


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

"""What a generated image records, and saving a result's images as PNGs with it: image i's settings (those
that reproduce it alone) and the inputs it was made from, the same way for ``faceid generate``, ``faceid swap``
and ``faceid serve``.

Images are shared; the folders of the person who made them are not. A record names every local input file by
its name and sha256 and never by its path (``file_record``: ``{"name": "me.jpg", "sha256": "..."}``, a folder by
its name alone); a model is named as it was given when that is a released name or a Hub id, else by the same
record. The settings' model fields that name a local file or folder (``base_model``, ``vae``, ``tiny_vae``,
``adapter``, ``loras``) are left out of the settings and recorded under ``model_files`` instead: reading the
settings back (``GenerationSettings.from_png``) then leaves the models to the pipeline that runs them, and
``faceid generate --settings IMAGE.png`` asks for those model flags again (checking the files by their
sha256), as it asks for the face photos.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .outputs import save_png
from .settings import GenerationSettings

#: The key under which an image records the models it was made with that are local files or folders.
MODEL_FILES = "model_files"
# The model fields that name one model each (``loras`` names several, with their weights).
_SINGLE_MODELS = ("base_model", "vae", "tiny_vae", "adapter")


def is_local(source: str | os.PathLike) -> bool:
    """Whether a model or input named ``source`` is a file or folder on this machine (what loading it would
    use; anything else is a released name or a Hub id)."""
    return Path(source).expanduser().exists()


def file_record(path: str | os.PathLike, *, remember: bool = False) -> dict[str, str]:
    """How a record names a local file: its name and sha256; a folder: its name. ``remember``: a model file,
    hashed once per size and modification time (``faceid.hub.file_sha256``), not on every image."""
    path = Path(path).expanduser()
    name = Path(os.path.abspath(path)).name  # "." and "dir/.." have names too
    if path.is_dir():
        return {"name": name}
    if remember:
        from .hub import file_sha256

        return {"name": name, "sha256": file_sha256(path)}
    return {"name": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def source_record(source: str | os.PathLike) -> str | dict[str, str]:
    """A model as a record names it: a released name or Hub id as given, a local file or folder by its
    ``file_record``."""
    return file_record(source, remember=True) if is_local(source) else str(source)


def matches(record: Mapping[str, Any], path: str | os.PathLike, *, remember: bool = False) -> bool:
    """Whether ``path`` is the file a ``file_record`` names (by its sha256), or a folder of the recorded name
    (``remember``: as ``file_record``'s, for a model file)."""
    if not is_local(path):
        return False
    given = file_record(path, remember=remember)
    if "sha256" in record:
        return given.get("sha256") == record["sha256"]
    return given == record  # a folder: by its name


def shareable_settings(settings: GenerationSettings) -> dict[str, Any]:
    """``settings`` as JSON without a local path: the model fields that name a local file or folder go under
    ``model_files`` as records (each LoRA with its ``weight``); released names and Hub ids stay settings."""
    data = settings.to_json()
    local: dict[str, Any] = {}
    for key in _SINGLE_MODELS:
        if key in data and is_local(data[key]):
            local[key] = file_record(data.pop(key), remember=True)
    loras = data.get("loras") or {}
    files = [source for source in loras if is_local(source)]
    if files:
        local["loras"] = [{**file_record(source, remember=True), "weight": loras[source]} for source in files]
        data["loras"] = {source: weight for source, weight in loras.items() if source not in files}
        if not data["loras"]:
            del data["loras"]
    if local:
        data[MODEL_FILES] = local
    return data


def image_metadata(settings: GenerationSettings, index: int, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What image ``index`` of a result made with ``settings`` (one seed per image) records: the settings that
    reproduce it alone (``settings.for_image(index)``, local models under ``model_files``), what it was made
    from and anything else to keep with it (``inputs``: input files as ``file_record``\\ s, upload ids,
    scores...), the terms of the weights and face models its method used (``licences``, ``commercial_use``: several
    are non-commercial), and the faceid version."""
    from .methods import identity_method

    terms = identity_method(settings.method).licence_record()
    return {**shareable_settings(settings.for_image(index)), **(inputs or {}), **terms, "faceid_version": __version__}


def save_images(
    images: Sequence[Any],
    settings: GenerationSettings,
    paths: Sequence[str | os.PathLike],
    inputs: Mapping[str, Any] | None = None,
    per_image: Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Save image i of a result made with ``settings`` at ``paths[i]``, a PNG that records its
    ``image_metadata``: ``inputs`` for every image, and ``per_image[i]`` for image i alone."""
    if len(paths) != len(images) or (per_image is not None and len(per_image) != len(images)):
        raise ValueError(f"{len(images)} images need as many paths ({len(paths)}) and per-image records")
    return [
        save_png(image, path, image_metadata(settings, i, {**(inputs or {}), **(per_image[i] if per_image else {})}))
        for i, (image, path) in enumerate(zip(images, paths, strict=True))
    ]


def free_path(path: str | os.PathLike) -> Path:
    """``path``, or ``name-1.png``, ``name-2.png``... if taken: never overwrite earlier results."""
    path = Path(path)
    candidate, k = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate

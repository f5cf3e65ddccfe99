"""From what a user gives as "the face" to the tensors the identity projection takes.

A call has one *identity* per prompt; an identity is one or more photos of one person. Each photo may
come as a picture (analysed here), a ``Face`` from ``FaceAnalyzer``, or a ready embedding. Several
photos of one person are combined by averaging their normalised embeddings (``"mean"``) or by
concatenating their identity tokens (``"concat"``, what FaceID-Portrait was trained for).

The Plus variants also need CLIP ViT image features of each face, aligned to the ArcFace template at
224x224 (``Face.crop_224``): ``CLIPFaceEncoder`` computes them as the reference does (penultimate
hidden states; the unconditional features come from an all-zero pixel tensor).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import FaceIDError
from .hub import HubFolder
from .variants import CLIP_VIT_H

COMBINE_MODES = ("mean", "concat")


@dataclass
class Identities:
    """One entry per identity (prompt), each holding one entry per photo."""

    embeddings: list[list[torch.Tensor]]  # (dim,) each
    crops: list[list[Any]]  # aligned 224x224 RGB face crops (None where unknown)
    faces: list[list[Any]]  # Face from analysis (None for embeddings given directly)

    def __len__(self) -> int:
        return len(self.embeddings)

    def repeat(self, count: int) -> Identities:
        return Identities(self.embeddings * count, self.crops * count, self.faces * count)

    @property
    def photos_per_identity(self) -> list[int]:
        return [len(e) for e in self.embeddings]


def is_embedding(value: Any) -> bool:
    """A float vector or stack of embeddings, as opposed to an image (HxWx3) or a path."""
    if torch.is_tensor(value):
        floating, shape = value.is_floating_point(), tuple(value.shape)
    elif isinstance(value, np.ndarray):
        floating, shape = value.dtype.kind == "f", value.shape
    else:
        return False
    # (dim,), (identities, dim) or (identities, photos, dim); an image's last axis is its 1-4 channels.
    return floating and 1 <= len(shape) <= 3 and shape[-1] > 4


def is_face(value: Any) -> bool:
    return hasattr(value, "embedding") and hasattr(value, "landmarks")


def _as_tensor(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().float().cpu()
    return torch.as_tensor(np.asarray(value, dtype=np.float32))


def collect(face: Any, analyze: Callable[[Any], Any], face_image: Any = None) -> Identities:
    """Parse ``face`` into identities.

    ``face`` is one identity or a list with one identity per prompt; an identity is a photo (path, PIL
    image, HxWx3 array), a ``Face``, an embedding, or a list/tuple of those (several photos of one
    person). A float array/tensor (n, dim) holds n identities; (n, k, dim) holds n identities of k photos.
    ``face_image``: aligned 224x224 crops for the Plus variants when ``face`` holds embeddings, nested
    like ``face``. ``analyze`` turns a photo into a ``Face``.
    """
    if face is None:
        raise FaceIDError("no face given: pass face= a photo, a face-analysis result or an embedding")
    if is_embedding(face):
        tensor = _as_tensor(face)
        tensor = tensor.reshape(-1, *tensor.shape[-2:]) if tensor.ndim == 3 else tensor.reshape(-1, 1, tensor.shape[-1])
        identities = [list(row) for row in tensor]
    else:
        entries = list(face) if isinstance(face, list) else [face]
        if not entries:
            raise FaceIDError("no face given: the list of faces is empty")
        identities = [_photos(entry) for entry in entries]
    crops_given = _nest_like(face_image, identities) if face_image is not None else None

    embeddings, crops, faces = [], [], []
    for i, photos in enumerate(identities):
        row_e, row_c, row_f = [], [], []
        for j, photo in enumerate(photos):
            if is_embedding(photo):
                found = None
                embedding = _as_tensor(photo)
                if embedding.ndim != 1:
                    raise FaceIDError(
                        f"an embedding inside a list must be a vector, got shape {tuple(embedding.shape)}"
                    )
            else:
                found = photo if is_face(photo) else analyze(photo)
                embedding = _as_tensor(found.embedding)
            crop = crops_given[i][j] if crops_given else getattr(found, "crop_224", None)
            row_e.append(embedding)
            row_c.append(crop)
            row_f.append(found)
        embeddings.append(row_e)
        crops.append(row_c)
        faces.append(row_f)
    return Identities(embeddings, crops, faces)


def _photos(entry: Any) -> list:
    if isinstance(entry, tuple | list):
        if not entry:
            raise FaceIDError("an identity with no photos was given")
        return list(entry)
    if is_embedding(entry):
        tensor = _as_tensor(entry)
        return list(tensor) if tensor.ndim == 2 else [tensor]
    return [entry]


def _nest_like(face_image: Any, identities: list[list]) -> list[list]:
    """``face_image`` in the same identity/photo nesting as the faces, or a clear error."""
    flat_count = sum(len(p) for p in identities)
    images = face_image if isinstance(face_image, list | tuple) else [face_image]
    if all(isinstance(x, list | tuple) for x in images) and len(images) == len(identities):
        nested = [list(x) for x in images]
    elif len(images) == flat_count:
        it = iter(images)
        nested = [[next(it) for _ in photos] for photos in identities]
    elif len(images) == 1:
        nested = [[images[0]] * len(photos) for photos in identities]
    else:
        raise FaceIDError(f"{len(images)} face images for {flat_count} faces: give one aligned face image per face")
    if [len(x) for x in nested] != [len(p) for p in identities]:
        raise FaceIDError("face_image is not nested like face: give one aligned face image per face")
    return nested


def stack(identities: Identities, combine: str) -> torch.Tensor:
    """Embeddings for the projection: (n, dim) for one photo each or ``"mean"``, (n, k, dim) for ``"concat"``."""
    if combine not in COMBINE_MODES:
        raise FaceIDError(f"unknown combine mode {combine!r}: use one of {', '.join(COMBINE_MODES)}")
    dims = {e.shape[-1] for row in identities.embeddings for e in row}
    if len(dims) > 1:
        raise FaceIDError(f"the faces give embeddings of different sizes: {sorted(dims)}")
    counts = identities.photos_per_identity
    if combine == "concat" or all(c == 1 for c in counts):
        if len(set(counts)) > 1:
            raise FaceIDError(
                f"combine='concat' needs the same number of photos for every identity, got {counts}; "
                "use combine='mean' or give equal numbers"
            )
        tensor = torch.stack([torch.stack(row) for row in identities.embeddings])
        return tensor[:, 0] if counts[0] == 1 else tensor
    # The weights were trained on unit-length embeddings: average the unit vectors, then re-normalise.
    rows = []
    for row in identities.embeddings:
        unit = torch.nn.functional.normalize(torch.stack(row), dim=-1)
        rows.append(torch.nn.functional.normalize(unit.mean(0), dim=-1) if len(row) > 1 else row[0])
    return torch.stack(rows)


def combine_features(features: torch.Tensor, counts: list[int], combine: str) -> torch.Tensor:
    """Per-photo CLIP features (sum(counts), L, C) grouped like ``stack`` groups the embeddings."""
    groups = torch.split(features, counts)
    if combine == "concat" or all(c == 1 for c in counts):
        tensor = torch.stack(groups)
        return tensor[:, 0] if counts[0] == 1 else tensor
    return torch.stack([group.mean(0) for group in groups])


def clip_image_processor():
    """transformers' PIL CLIP image processor class, also where torchvision is installed.

    With torchvision present, ``CLIPImageProcessor`` is the torchvision implementation, which resizes
    differently; the PIL one is what the reference used (and OpenAI's CLIP preprocessing is PIL bicubic), so
    every machine gives the same CLIP inputs, and the Plus identity tokens and CLIP-T scores stay the same.
    """
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class CLIPFaceEncoder:
    """CLIP ViT image features of aligned face crops, as the FaceID-Plus reference computes them."""

    def __init__(self, model, processor=None):
        self.model = model.eval().requires_grad_(False)
        # The reference builds CLIPImageProcessor() with the library defaults, whatever the model ships.
        self.processor = processor or clip_image_processor()()

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | HubFolder | None = None, dtype: torch.dtype = torch.float32, device=None
    ) -> CLIPFaceEncoder:
        """A folder or Hub repo id; by default the pinned CLIP ViT-H of ``faceid.variants.CLIP_VIT_H``."""
        from transformers import CLIPVisionModelWithProjection

        from .hub import model_not_found, offline

        source = path if isinstance(path, HubFolder) else HubFolder(str(path), None, None) if path else CLIP_VIT_H
        try:
            kwargs = {k: v for k, v in (("subfolder", source.subfolder), ("revision", source.revision)) if v}
            model = CLIPVisionModelWithProjection.from_pretrained(
                source.repo, dtype=dtype, local_files_only=offline(), **kwargs
            )
        except Exception as exc:
            raise model_not_found(str(source), exc) from exc
        return cls(model.to(device) if device is not None else model)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, crops: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel values, features, unconditional features) for a list of face crops."""
        if any(c is None for c in crops):
            raise FaceIDError(
                "this adapter (FaceID-Plus) needs the aligned face image: pass photos or Face objects, "
                "or give face_image= with the 224x224 aligned crops when passing embeddings"
            )
        return self.features(crops)

    @torch.no_grad()
    def features(
        self, images: Sequence[Any], penultimate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel values, features, features for "no image") of any images.

        ``penultimate``: the penultimate hidden states, and for "no image" those of an all-zero pixel tensor
        (FaceID-Plus, IP-Adapter-Plus); else the projected image embedding, and zeros (plain IP-Adapter).
        """
        param = next(self.model.parameters())
        images = [np.asarray(c) if not hasattr(c, "convert") else c.convert("RGB") for c in images]
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
        if not penultimate:
            embeds = self.model(pixels).image_embeds
            return pixels, embeds, torch.zeros_like(embeds)
        features = self.model(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = self.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return pixels, features, uncond

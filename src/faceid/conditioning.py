"""Conditioning: what a call feeds the denoiser besides noise, encoded once per call.

``encode(models, prompt, face, ...)`` turns prompts and faces into a ``Conditioning``: the text embeddings (the
base pipeline's own ``encode_prompt``), the identity tokens of every face (the identity adapter's projection of
its embedding, with CLIP features of its aligned crop for Plus), the people's regions and the tokens of style
and composition references. Prompt i pairs with face i; each is repeated per image when the call runs. A
``Conditioning`` can be reused by several calls (best-of rounds, batches in parts) and is never changed by one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import identity
from .errors import FaceIDError
from .groups import EncodedReference, Reference, check_box, is_box, resolve_regions
from .images import load_image
from .settings import ENCODE_FIELDS, GenerationSettings

if TYPE_CHECKING:
    from .model_set import ModelSet

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything a call feeds the UNet, before the per-image repetition done by the pipeline."""

    pipe_kwargs: dict[str, torch.Tensor]  # prompt_embeds etc., already repeated per image
    identity: torch.Tensor  # (prompts, tokens, dim) conditional identity tokens
    uncond_identity: torch.Tensor  # (prompts, tokens, dim) unconditional identity tokens
    num_images_per_prompt: int
    faces: list = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)  # Plus: CLIP pixels and features of the faces
    settings: GenerationSettings | None = None  # the encode-time settings (prompts, faces, combine...), resolved
    # Several people in one picture: ``identity`` is (prompts, people, tokens, dim), one region per person.
    regions: list = field(default_factory=list)
    references: list[EncodedReference] = field(default_factory=list)  # style/composition references
    # The identity method whose tokens ``identity`` holds (faceid.methods): "faceid" (the FaceID adapter's
    # projection), or "instantid" (InstantID's Resampler over the raw antelopev2 embedding(s) of each identity).
    method: str = "faceid"

    def images(self, indices: Sequence[int]) -> Conditioning:
        """The conditioning of images ``indices`` alone, one image per prompt: a batch run in parts."""
        n = self.num_images_per_prompt
        owners = [i // n for i in indices]
        rows = torch.tensor(list(indices))
        prompts = [self.prompts[o] for o in owners]
        negatives = [self.negative_prompts[o] for o in owners]
        return Conditioning(
            pipe_kwargs={k: v[rows.to(v.device)] for k, v in self.pipe_kwargs.items() if v is not None},
            identity=self.identity[owners],
            uncond_identity=self.uncond_identity[owners],
            num_images_per_prompt=1,
            faces=[self.faces[o] for o in owners] if self.faces else [],
            prompts=prompts,
            negative_prompts=negatives,
            clip=self.clip,
            regions=self.regions,
            references=self.references,
            method=self.method,
            settings=None
            if self.settings is None
            else self.settings.replace(prompt=prompts, negative_prompt=negatives, num_images_per_prompt=1),
        )

    def identity_states(self, classifier_free_guidance: bool, unconditional: bool = False) -> torch.Tensor:
        """Identity tokens in the UNet's batch order: [uncond p0 p0 p1 p1 ; cond p0 p0 p1 p1]
        (``unconditional``: the unconditional tokens of the conditional half alone)."""
        n = self.num_images_per_prompt
        if unconditional:
            return self.uncond_identity.repeat_interleave(n, dim=0)
        cond = self.identity.repeat_interleave(n, dim=0)
        if not classifier_free_guidance:
            return cond
        return torch.cat([self.uncond_identity.repeat_interleave(n, dim=0), cond])


@torch.no_grad()
def encode(
    models: ModelSet,
    prompt: str | Sequence[str] | None = None,
    face: Any = None,
    settings: GenerationSettings | Mapping[str, Any] | None = None,
    *,
    face_image: Any = None,
    regions: Any = None,
    style: Sequence[Any] | None = None,
    **overrides: Any,
) -> Conditioning:
    """Text embeddings and identity tokens for a call; prompt i pairs with identity i.

    See ``FaceIDPipeline.__call__`` for the arguments (only the settings of ``faceid.settings.ENCODE_FIELDS`` matter
    here); ``face_image`` gives the aligned 224x224 face crops that the Plus variants need when
    ``face`` holds embeddings rather than photos or ``Face`` objects. With ``regions`` (or the settings'
    ``regions``), ``face`` lists the people of every picture instead, person k in region k.
    """
    unknown = sorted(set(overrides) - set(ENCODE_FIELDS))
    if unknown:
        raise FaceIDError(f"encode() takes the settings {', '.join(ENCODE_FIELDS)}; not {', '.join(unknown)}")
    if prompt is not None:
        overrides["prompt"] = list(prompt) if isinstance(prompt, tuple) else prompt
    encoded = models.resolve_settings(GenerationSettings.parse(settings, **overrides))
    found = identity.collect(face, lambda photo: models.face_analyzer.get(photo, index=encoded.face_index), face_image)
    prompts = as_list(encoded.prompt)
    if regions is None:
        regions = encoded.regions
    if regions == "masks":
        raise FaceIDError("these settings place the people by mask images: give the masks with regions=[...]")
    placed: list = []
    if regions is not None and encoded.method != "faceid":
        raise FaceIDError(
            f"several people in one picture (regions) run with method faceid only, not {encoded.method}: leave "
            "regions out, or use method faceid"
        )
    if regions is not None:  # several people in each picture, not one person per prompt
        recorded, placed = resolve_regions(regions, len(found), lambda image: models.face_analyzer.analyze(image))
        encoded = encoded.replace(regions=recorded)
    if style is None and encoded.style:
        raise FaceIDError(
            f"these settings name {len(encoded.style)} style reference(s): give their images with "
            "style=[Reference(image, ...)] (CLI --style)"
        )
    references = encode_references(models, style or [])
    if references:
        encoded = encoded.replace(style=[style_setting(r) for r in references])
    if not placed:  # pair faces with prompts (placed people are in every picture instead)
        if len(prompts) == 1 and len(found) > 1:
            prompts = prompts * len(found)
        if len(found) == 1 and len(prompts) > 1:
            found = found.repeat(len(prompts))
        if len(found) != len(prompts):
            raise FaceIDError(
                f"{len(prompts)} prompts but {len(found)} faces: give one face for all prompts, "
                "one prompt for all faces, or one face per prompt"
            )
    negatives = as_list(encoded.negative_prompt)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise FaceIDError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    num_images_per_prompt = encoded.num_images_per_prompt
    if encoded.method != "faceid":
        cond, uncond = method_tokens(models, encoded.method, found)
        clip = {}
    else:
        cond, uncond, clip = faceid_tokens(models, found, encoded)
    faces = [row[0] if len(row) == 1 else row for row in found.faces]
    if placed:  # every prompt gets all the people: (prompts, people, tokens, dim)
        cond = cond[None].expand(len(prompts), *cond.shape).contiguous()
        uncond = uncond[None].expand(len(prompts), *uncond.shape).contiguous()
        faces = [faces] * len(prompts)

    text = models.encode_prompt(prompts, negatives, num_images_per_prompt)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return Conditioning(
        # A family without negative prompts (FLUX.1) gives None for their embeddings: not passed on.
        pipe_kwargs={name: value for name, value in zip(names, text, strict=False) if value is not None},
        identity=cond,
        uncond_identity=uncond,
        num_images_per_prompt=num_images_per_prompt,
        faces=faces,
        prompts=prompts,
        negative_prompts=negatives,
        clip=clip,
        regions=placed,
        references=references,
        method=encoded.method,
        settings=encoded.replace(
            prompt=prompts[0] if isinstance(encoded.prompt, str) else prompts,
            negative_prompt=negatives[0] if isinstance(encoded.negative_prompt, str) else negatives,
        ),
    )


def faceid_tokens(
    models: ModelSet, found: identity.Identities, encoded: GenerationSettings
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The FaceID adapter's identity tokens (cond, uncond) of each identity, and the CLIP inputs of Plus."""
    combine = encoded.combine
    embeds = identity.stack(found, combine)
    check_embedding_dim(models, embeds)

    clip = {}
    if models.adapter.projection.needs_clip:
        if models.image_encoder is None:
            raise FaceIDError("this FaceID-Plus adapter needs a CLIP image encoder (image_encoder=...)")
        pixels, features, uncond = models.image_encoder([c for row in found.crops for c in row])
        counts = found.photos_per_identity
        clip = {
            "clip_pixel_values": pixels,
            "clip_embeds": identity.combine_features(features, counts, combine),
            "uncond_clip_embeds": identity.combine_features(uncond, counts, combine),
        }
    cond, uncond = models.adapter.identity_tokens(
        embeds,
        clip.get("clip_embeds"),
        clip.get("uncond_clip_embeds"),
        shortcut=bool(encoded.shortcut),
        s_scale=encoded.s_scale,
    )
    return cond, uncond, clip


def method_tokens(models: ModelSet, name: str, found: identity.Identities) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity tokens (cond, uncond), ``(identities, tokens, dim)``, of a method loaded beside FaceID
    (``ModelSet.load_method``). InstantID reads the *raw* antelopev2 embedding of every photo of an identity
    together (several photos of one person are one identity); an embedding given instead of a photo is taken as
    that raw vector."""
    from .methods import identity_method

    method = identity_method(name)
    loaded = models.loaded_method(name)
    rows = []
    for embeddings, faces in zip(found.embeddings, found.faces, strict=True):
        vectors = [
            given.numpy()
            if face is None
            # InfiniteYou embeds the aligned crop with a recognizer of its own (facexlib's IR-SE50).
            else loaded.face_embedding(face)
            if hasattr(loaded, "face_embedding")
            else face.embedding_for(method.face_pack, normalised=method.normalised)
            for given, face in zip(embeddings, faces, strict=True)
        ]
        rows.append(loaded.identity_tokens(np.stack(vectors)))
    if name == "infiniteyou":  # InfuseNet reads the tokens without guidance: no unconditional tokens
        cond = torch.cat(rows)
        return cond, torch.zeros_like(cond)
    return torch.cat([r.cond for r in rows]), torch.cat([r.uncond for r in rows])


def encode_references(models: ModelSet, style: Sequence[Any]) -> list[EncodedReference]:
    """The tokens of style and composition references (``Reference`` or bare images), read by the reference
    adapters ``models`` has loaded."""
    encoded = []
    for k, item in enumerate(style):
        ref = item if isinstance(item, Reference) else Reference(item)
        adapter = models.reference_adapter(ref.adapter)
        if ref.face_crop:  # the aligned face, as FaceID-Plus reads it (a Face, or the face of a photo)
            crop = ref.image.crop_224 if identity.is_face(ref.image) else models.face_analyzer.get(ref.image).crop_224
            image = load_image(crop)
        else:
            image = load_image(ref.image)
        _, features, uncond = models.reference_encoder.features([image], penultimate=adapter.spec.penultimate)
        cond, uncond_tokens = adapter.tokens(features, uncond)
        region = ref.region
        if is_box(region):
            region = check_box(region, f"reference {k}'s region")
        encoded.append(
            EncodedReference(adapter.name, cond, uncond_tokens, float(ref.scale), ref.window, region, ref.face_crop)
        )
    return encoded


def style_setting(reference: EncodedReference) -> dict[str, Any]:
    """A reference as the settings record it (``StyleSetting``): a mask region as ``"mask"``."""
    region = reference.region if reference.region is None or isinstance(reference.region, tuple) else "mask"
    return {
        "adapter": reference.adapter,
        "scale": reference.scale,
        "window": reference.window,
        "region": region,
        "face_crop": reference.face_crop or None,
    }


def check_embedding_dim(models: ModelSet, embeds: torch.Tensor) -> None:
    """Refuse embeddings of the wrong width; warn about ones that are not L2-normalised."""
    expected = models.adapter.spec.id_dim
    if embeds.shape[-1] != expected:
        raise FaceIDError(
            f"face embeddings are {embeds.shape[-1]}-d but the adapter takes {expected}-d embeddings "
            "(insightface buffalo_l ArcFace)"
        )
    norms = embeds.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
        logger.warning(
            "face embeddings are not L2-normalised (norms %s); the released adapters were trained on "
            "insightface's normed_embedding",
            [round(float(n), 3) for n in norms.flatten()[:4]],
        )


def as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)

"""Style and composition references: the standard IP-Adapters next to FaceID, as extra token groups.

A reference image is read by a standard IP-Adapter (``h94/IP-Adapter``): CLIP ViT-H encodes the image,
the adapter's projection turns that into image tokens, and its own ``to_k_ip``/``to_v_ip`` read them in
every cross-attention layer. Here such an adapter is one more ``DecoupledBranch`` in the FaceID processors
(``faceid.attention``), so FaceID, each person and each reference are token groups of one processor, each
with its own scale, region and step window. The checkpoints load as published, in either official layout:

* plain (``ip-adapter_sd15``, ``ip-adapter_sdxl_vit-h``): ``ImageProjModel``, a linear map of CLIP's
  projected image embedding to 4 tokens plus a LayerNorm; "no image" is the projection of zeros;
* Plus (``ip-adapter-plus[-face]_sd15``, ``..._sdxl_vit-h``): the ``Resampler``, 16 learned queries over
  CLIP's penultimate hidden states; "no image" is the projection of the features of an all-zero image.

Which a file is, its token count and widths are read off its tensors (``ReferenceSpec``), as for FaceID.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import load_strict
from .attention import DecoupledBranch
from .checkpoints import describe_unet, family_name, load_state_dict, perceiver_config
from .errors import CheckpointError, FaceIDError
from .hub import HubFile
from .projection import ImageProjection, ImageResampler, PerceiverConfig
from .settings import StyleSetting

_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")


# h94/IP-Adapter at commit 92a2d51 ("Add an updated version of IP-Adapter-Face"), whose history holds the upload
# of every file below. Not 0859e80, the image encoder's commit (``variants.CLIP_VIT_H``): the SDXL ViT-H files
# came after it (ip-adapter_sdxl_vit-h.bin moved into sdxl_models/ in 5c2eae7; the Plus and Plus-Face ones were
# added in 9fa34f0 and 336d6b3). Their sha256 and size are the Git LFS pointers of the commits that uploaded
# them (https://huggingface.co/h94/IP-Adapter/commit/<commit>, the commit named at each file); none changed after.
REFERENCE_REVISION = "92a2d51861c754afacf8b3aaf90845254b49f219"


def _reference_file(filename: str, subfolder: str, sha256: str, size: int) -> HubFile:
    return HubFile("h94/IP-Adapter", filename, REFERENCE_REVISION, sha256, size, subfolder=subfolder)


# The standard IP-Adapters for the ViT-H image encoder that FaceID-Plus loads too (``variants.CLIP_VIT_H``).
REFERENCE_ADAPTERS: dict[str, dict[str, HubFile]] = {
    "plain": {
        "SD1.5": _reference_file(  # 8bc5c62 ("add models")
            "ip-adapter_sd15.bin",
            "models",
            "68e1df30d760f280e578c302f1e73b37ea08654eff16a31153588047affe0058",
            44642825,
        ),
        "SDXL": _reference_file(  # 55964dc ("add ip-adapter_sdxl_vit-h", then in models/)
            "ip-adapter_sdxl_vit-h.bin",
            "sdxl_models",
            "6b382e2501d0ab3fe2e09312e561a59cd3f21262aff25373700e0cd62c635929",
            698390793,
        ),
    },
    "plus": {
        "SD1.5": _reference_file(  # e5ae368 ("add ip-adapter-plus")
            "ip-adapter-plus_sd15.bin",
            "models",
            "1cb77fc0613369b66be1531cc452b823a4af7d87ee56956000a69fc39e3817ba",
            158033179,
        ),
        "SDXL": _reference_file(  # 9fa34f0 ("add new")
            "ip-adapter-plus_sdxl_vit-h.bin",
            "sdxl_models",
            "ec70edb7cc8e769c9388d94eeaea3e4526352c9fae793a608782d1d8951fde90",
            1013454427,
        ),
    },
    "plus-face": {
        "SD1.5": _reference_file(  # b812dc3 ("add ip-adapter for face")
            "ip-adapter-plus-face_sd15.bin",
            "models",
            "aa09c22b49ef63474dcde12f26a35b8b8e9b755b716a553aa29e8dbe8d21e0c9",
            98183381,
        ),
        "SDXL": _reference_file(  # 336d6b3 ("add experimental version of ip-adapter-face for sdxl")
            "ip-adapter-plus-face_sdxl_vit-h.bin",
            "sdxl_models",
            "50e886d82940b3c5873d80c2b06d8a4b0d0fccec70bc44fd53f16ac3cfd7fc36",
            1013454761,
        ),
    },
}


def reference_name(source: str | Path) -> str:
    """The name ``FaceIDPipeline.load_reference`` gives an adapter by default: the kind (``plus-face``...), or
    the file's name without its suffix (dots made dashes: a branch name has none)."""
    return str(source) if str(source) in REFERENCE_ADAPTERS else Path(source).stem.replace(".", "-")


def style_records(
    scales: Sequence[float | None],
    adapter: str,
    *,
    window: tuple[float, float] | None = None,
    recorded: Sequence[Mapping[str, Any]] = (),
    combo_scale: float | None = None,
) -> list[dict[str, Any]]:
    """The ``style`` settings of reference images read by the reference adapter named ``adapter``: one per
    entry of ``scales``, acting in ``window``; then, with ``combo_scale``, the reference of an adapter
    combination (``faceid.combos``: it reads the face photo) at that scale.

    ``recorded``: the ``style`` settings an image was made with (``GenerationSettings.style``, as dicts): a
    scale or window left open (None) is the recorded one at the same place, so that the same images make
    that image again; else the default. A recorded reference that acts in a region cannot be given as an
    image and a scale: ``FaceIDError``.
    """
    records = []
    for k, scale in enumerate(scales):
        before = recorded[k] if k < len(recorded) else {}
        if before.get("region") is not None:
            raise FaceIDError(
                f"the settings' style reference {k} acts in a region, which an image and a scale cannot give: use "
                "the Python API (Reference(image, region=...))"
            )
        records.append({
            "adapter": adapter,
            "scale": before.get("scale", StyleSetting.model_fields["scale"].default) if scale is None else scale,
            "window": window or before.get("window"),
        })  # fmt: skip
    if combo_scale is not None:
        records.append({"adapter": adapter, "scale": combo_scale})
    return records


@dataclass(frozen=True)
class ReferenceSpec:
    """What a standard IP-Adapter checkpoint is, read off its tensors."""

    cross_attention_dim: int
    num_tokens: int
    clip_dim: int  # CLIP's image embedding (plain) or hidden size (Plus)
    resampler: PerceiverConfig | None  # Plus
    resampler_dim: int | None
    ip_layers: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "plus" if self.resampler else "plain"

    @property
    def penultimate(self) -> bool:
        """Whether it reads CLIP's penultimate hidden states (Plus) rather than the image embedding."""
        return self.resampler is not None

    def describe(self) -> str:
        what = "IP-Adapter-Plus" if self.resampler else "IP-Adapter"
        return f"a {what} ({self.num_tokens} tokens) for {describe_unet(self.cross_attention_dim, len(self.ip_layers))}"

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, dict[str, torch.Tensor]],
        label: str,
        kind: str = "a standard IP-Adapter (ip-adapter[-plus][-face]_sd15, ..._sdxl_vit-h)",
    ) -> ReferenceSpec:
        """What ``state`` is; ``kind`` names what the caller expected, for the errors (InstantID's ip-adapter.bin is
        read here too)."""
        proj, ip = state["image_proj"], state["ip_adapter"]
        if "latents" in proj:
            try:
                latents, proj_out = proj["latents"], proj["proj_out.weight"]
                resampler = perceiver_config(proj, "", latents.shape[-1])
            except KeyError as exc:
                raise CheckpointError(f"{label}: its Resampler lacks {exc.args[0]!r}") from None
            cad, tokens, resampler_dim = proj_out.shape[0], latents.shape[1], latents.shape[-1]
            clip_dim = resampler.clip_dim
        elif "proj.weight" in proj and "norm.weight" in proj:
            cad = proj["norm.weight"].shape[0]
            tokens, clip_dim = proj["proj.weight"].shape[0] // cad, proj["proj.weight"].shape[1]
            resampler = resampler_dim = None
        else:
            hint = (
                " It is an IP-Adapter-FaceID checkpoint: load it as the pipeline's adapter."
                if "proj.0.weight" in proj
                else ""
            )
            raise CheckpointError(
                f"{label} is not {kind}: its 'image_proj' has neither a Resampler ('latents') nor an ImageProjModel "
                f"('proj', 'norm').{hint}"
            )
        ip_layers = {}
        for key, tensor in ip.items():
            match = _LAYER_KEY.match(key)
            if not match:
                raise CheckpointError(f"{label}: unexpected key 'ip_adapter.{key}' for {kind}")
            ip_layers[int(match.group(1))] = tuple(tensor.shape)
        return cls(cad, tokens, clip_dim, resampler, resampler_dim, dict(sorted(ip_layers.items())))

    def projection(self) -> nn.Module:
        if self.resampler is not None:
            return ImageResampler(self.resampler_dim, self.resampler, self.num_tokens, self.cross_attention_dim)
        return ImageProjection(self.cross_attention_dim, self.num_tokens, self.clip_dim)


class ReferenceAdapter:
    """A standard IP-Adapter installed as one more branch of a FaceID adapter's processors."""

    def __init__(self, faceid, spec: ReferenceSpec, name: str, projection: nn.Module, label: str):
        self.faceid = faceid
        self.spec = spec
        self.name = name
        self.label = label
        self.projection: nn.Module | None = projection
        self.branches: dict[str, DecoupledBranch] = {}

    @classmethod
    def install(
        cls, faceid, checkpoint: str | Path | dict, name: str = "style", label: str | None = None
    ) -> ReferenceAdapter:
        """Load ``checkpoint`` (a path in either official layout, or its state dict) next to ``faceid``, the
        ``FaceIDAdapter`` whose processors get the branch ``name``."""
        label = label or (Path(checkpoint).name if isinstance(checkpoint, (str, Path)) else "reference checkpoint")
        state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        spec = ReferenceSpec.from_state_dict(state, label)
        faceid.check_attached()
        unet_cad = faceid.unet.config.cross_attention_dim
        if spec.cross_attention_dim != unet_cad:
            raise CheckpointError(
                f"{label} does not fit this base model: it is {spec.describe()}, while the base model is "
                f"{family_name(unet_cad)} (cross-attention dim {unet_cad}). Use the reference adapter made for "
                f"{family_name(unet_cad)}."
            )
        if not name or "." in name or any(name in p.branches for p in faceid.processors.values()):
            taken = sorted(next(iter(faceid.processors.values())).branches)
            raise FaceIDError(f"reference adapter name {name!r} is empty, has a dot or is taken (loaded: {taken})")
        paths = [p for i, p in enumerate(faceid.unet.attn_processors) if i in spec.ip_layers]
        paths = [p.removesuffix(".processor") for p in paths]
        if sorted(paths) != sorted(faceid.processors):
            raise CheckpointError(
                f"{label}: its layers ({len(spec.ip_layers)}) are not this UNet's cross-attention layers "
                f"({len(faceid.processors)}); is it for this base model?"
            )
        param = next(faceid.unet.parameters())
        projection = spec.projection()
        load_strict(projection, state["image_proj"], f"{label} image_proj")
        adapter = cls(faceid, spec, name, projection.to(param.device, param.dtype).eval().requires_grad_(False), label)
        for index, path in zip(spec.ip_layers, paths, strict=True):
            attn = faceid.unet.get_submodule(path)
            branch = DecoupledBranch.for_layer(attn)
            ip = state["ip_adapter"]
            weights = {"to_k_ip.weight": ip[f"{index}.to_k_ip.weight"], "to_v_ip.weight": ip[f"{index}.to_v_ip.weight"]}
            load_strict(branch, weights, f"{label} ip_adapter.{index}")
            adapter.branches[path] = branch.to(param.device, param.dtype).requires_grad_(False)
        for path, branch in adapter.branches.items():
            faceid.processors[path].branches[name] = branch
        return adapter

    @property
    def installed(self) -> bool:
        return self.projection is not None

    def remove(self) -> None:
        """Take the branch out of every processor again."""
        for path in self.branches:
            processor = self.faceid.processors.get(path)
            if processor is not None and self.name in processor.branches:
                del processor.branches[self.name]
        self.branches = {}
        self.projection = None

    @torch.no_grad()
    def tokens(self, features: torch.Tensor, uncond_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional image tokens of CLIP ``features`` (one row per image)."""
        if self.projection is None:
            raise FaceIDError(f"the reference adapter {self.name!r} was removed")
        param = next(self.projection.parameters())
        cond = self.projection(features.to(param.device, param.dtype))
        uncond = self.projection(uncond_features.to(param.device, param.dtype))
        return cond, uncond

    def check_encoder(self, encoder: Any) -> None:
        """Refuse an image encoder whose features are not the width this adapter reads."""
        config = encoder.model.config
        width = config.hidden_size if self.spec.penultimate else config.projection_dim
        if width != self.spec.clip_dim:
            what = "hidden size" if self.spec.penultimate else "image embedding size"
            raise CheckpointError(
                f"{self.label} reads {self.spec.clip_dim}-d CLIP features but the image encoder's {what} is {width}: "
                "use the ViT-H image encoder of h94/IP-Adapter (models/image_encoder) with the ViT-H adapters"
            )

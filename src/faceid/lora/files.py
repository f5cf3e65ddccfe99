"""LoRA files as the ecosystem knows them (kohya/A1111/ComfyUI and diffusers/PEFT layouts): read anyone's,
write the identity LoRA as one. On top of diffusers' own key converters (no LoRA math of our own).

* :func:`read_lora`: a LoRA file (or state dict) -> :class:`LoraFile`, its UNet part under PEFT's names
  and its text-encoder part, with their alphas; what :class:`faceid.lora.LoraStack` loads.
* :func:`identity_lora_state_dict` / :func:`save_lora`: the identity LoRA of an installed
  ``FaceIDAdapter`` as a standalone LoRA file, the same thing as the released ``*_lora.safetensors``
  twins. The released SD1.5 files are kohya-style (A1111/ComfyUI) with diffusers module names and **no**
  ``.alpha`` tensors::

      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight  [128, 320]
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight    [320, 128]

  in fp16 (written without header metadata, exactly these tensors make a file of the size of
  ``ip-adapter-faceid_sd15_lora.safetensors``, 51,059,544 bytes, its Git LFS size); ``save_lora`` adds a
  small metadata header saying what the file is. Kohya readers (A1111, ComfyUI, diffusers) take a missing
  alpha as scale 1, which is the FaceID LoRA's ``W x + up(down(x))``; ``alpha=True`` writes
  ``alpha = rank`` instead (the same scale, spelled out). ``layout="diffusers"`` writes diffusers/PEFT
  keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, as ``StableDiffusionPipeline.save_lora_weights``
  does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import FaceIDAdapter

__all__ = ["LAYOUTS", "PEFT_KEY", "LoraFile", "identity_lora_state_dict", "read_lora", "save_lora"]

LAYOUTS = ("kohya", "diffusers")
#: A UNet LoRA tensor under PEFT's names: ``<module path>.lora_A.weight`` (down) / ``.lora_B.weight`` (up).
PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# Kohya/A1111 metadata names for the base model (what A1111 reads to sort LoRAs by SD version).
_KOHYA_BASE = {768: "sd_v1", 2048: "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {768: "stable-diffusion-v1/lora", 2048: "stable-diffusion-xl-v1-base/lora"}


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class LoraFile:
    """A LoRA file as a UNet and its text encoders take it (names as diffusers converts them)."""

    layout: str  # "kohya" (A1111/ComfyUI) or "diffusers" (diffusers/PEFT)
    unet: dict[str, torch.Tensor]  # PEFT keys without prefix: ``<module>.lora_A.weight`` / ``lora_B``
    unet_alphas: dict[str, float]  # kohya alphas of the UNet part, ``unet.``-prefixed
    unet_metadata: dict | None  # diffusers' LoRA config of the UNet part (``unet.r`` ...), if the file has one
    text: dict[str, torch.Tensor]  # the text-encoder part, ``text_encoder(_2).``-prefixed
    text_alphas: dict[str, float]


def read_lora(lora: str | Path | dict[str, torch.Tensor], unet: nn.Module, label: str) -> LoraFile:
    """Read a LoRA for ``unet``: a ``.safetensors`` (or pickled ``.bin``/``.pt``, read with ``weights_only``)
    file, a diffusers LoRA folder, or a state dict, in the kohya or diffusers/PEFT layout (SD1.5 or SDXL
    block names). ``CheckpointError`` for an unreadable file or one that is not a LoRA (``label`` names it).
    """
    raw, metadata = _read_tensors(lora, label)
    layout, unet_part, alphas, text_part, text_alphas = _to_peft(unet, raw, label)
    metadata = _unet_metadata(metadata, prefixed=any(k.startswith("unet.") for k in raw))
    return LoraFile(layout, unet_part, alphas, metadata, text_part, text_alphas)


def _read_tensors(lora: str | Path | dict, label: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The file's tensors and diffusers' LoRA config metadata (``lora_adapter_metadata``) if it has one."""
    metadata = None
    if isinstance(lora, dict):
        state = dict(lora)
    else:
        path = Path(lora)
        if path.is_dir():  # a diffusers LoRA folder
            candidates = [path / "pytorch_lora_weights.safetensors", path / "pytorch_lora_weights.bin"]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise CheckpointError(f"LoRA file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
                with safe_open(str(path), framework="pt") as handle:
                    raw_meta = (handle.metadata() or {}).get("lora_adapter_metadata")
                metadata = json.loads(raw_meta) if raw_meta else None
            else:
                # weights_only=True: a pickle can run code on load; a state dict of tensors needs none of that.
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable, truncated, not a tensor file at all
            raise CheckpointError(f"cannot read LoRA file {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = f"{len(state)} entries" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{label} is not a LoRA file: expected a flat dict of tensors, found {kind}")
    keys = list(state)
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        raise CheckpointError(
            f"{label} is an IP-Adapter(-FaceID) checkpoint, not a LoRA file; install it with FaceIDAdapter.install"
        )
    if not any("lora" in k for k in keys):
        raise CheckpointError(
            f"{label} is not a LoRA file: none of its {len(keys)} tensors is a LoRA weight (e.g. {', '.join(keys[:3])})"
        )
    return state, metadata


def _unet_metadata(metadata: dict | None, prefixed: bool) -> dict | None:
    """diffusers' LoRA config metadata for the UNet, with the ``unet.`` prefix ``load_lora_adapter`` expects.

    ``save_lora_weights`` prefixes it per component (``unet.r``); ``save_lora_adapter`` writes the UNet's
    config unprefixed next to unprefixed keys. Anything else (text encoders only) means: none.
    """
    if not metadata:
        return None
    if any(k.startswith("unet.") for k in metadata):
        return {k: v for k, v in metadata.items() if k.startswith("unet.")}
    if prefixed or any(k.startswith(_TEXT_ENCODER_PREFIXES) for k in metadata):
        return None
    return {f"unet.{k}": v for k, v in metadata.items()}


def _to_peft(
    unet: nn.Module, state: dict[str, torch.Tensor], label: str
) -> tuple[str, dict[str, torch.Tensor], dict[str, float], dict[str, torch.Tensor], dict[str, float]]:
    """(layout, UNet part as PEFT keys without prefix, its kohya alphas with the ``unet.`` prefix, the
    text-encoder part with its ``text_encoder(_2).`` prefix as diffusers converted it, and its alphas)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    layout = "kohya" if all(k.startswith(_KOHYA_PREFIXES) for k in state) else "diffusers"
    is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    loader = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    try:
        # Kohya keys (diffusers or SGM block names) -> diffusers keys; DoRA scales are dropped with a warning.
        converted, alphas = loader.lora_state_dict(dict(state), unet_config=unet.config)
    except Exception as exc:
        raise CheckpointError(f"{label}: not a LoRA layout diffusers can read: {type(exc).__name__}: {exc}") from exc

    has_prefix = any(k.startswith(("unet.", *_TEXT_ENCODER_PREFIXES)) for k in converted)
    unet_part: dict[str, torch.Tensor] = {}
    text_part: dict[str, torch.Tensor] = {}
    for key, tensor in converted.items():
        if key.startswith("unet."):
            unet_part[key.removeprefix("unet.")] = tensor
        elif has_prefix:
            text_part[key] = tensor
        else:  # an unprefixed PEFT/diffusers UNet state dict (``unet.save_lora_adapter``)
            unet_part[key] = tensor
    if unet_part and not all(PEFT_KEY.match(k) for k in unet_part):
        unet_part = convert_unet_state_dict_to_peft(unet_part)  # older diffusers names (``.lora.down.weight``)
    unsupported = [k for k in unet_part if not PEFT_KEY.match(k)]
    if unsupported:
        raise CheckpointError(
            f"{label}: unsupported LoRA tensors (only plain LoRA down/up pairs are supported), "
            f"e.g. {', '.join(unsupported[:3])}"
        )
    text_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(_TEXT_ENCODER_PREFIXES)}
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    return layout, unet_part, alphas, text_part, text_alphas


# ---------------------------------------------------------------------------------------------- writing
def identity_lora_state_dict(
    adapter: FaceIDAdapter, layout: str = "kohya", alpha: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter's identity LoRA as a standalone LoRA state dict (CPU tensors, the adapter's dtype).

    ``layout="kohya"``: ``lora_unet_<module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` like
    the released ``*_lora.safetensors`` (no ``.alpha``, i.e. scale 1; ``alpha=True`` adds ``alpha = rank``,
    the same scale spelled out). ``layout="diffusers"``: ``unet.<module path>.lora_A.weight`` /
    ``.lora_B.weight``. The weights are the LoRA as trained: ``lora_scale`` is a runtime knob and is not
    baked in, and a fused LoRA is exported unfused.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not adapter.installed:
        raise RuntimeError("the adapter was removed")
    if not adapter._lora_layers:
        raise CheckpointError(
            f"this adapter ({adapter.spec.describe()}) has no identity LoRA to export; "
            "FaceID Portrait checkpoints ship without one"
        )
    peft_state: dict[str, torch.Tensor] = {}
    for path in adapter._lora_layers:
        layer = adapter.unet.get_submodule(path)
        peft_state[f"unet.{path}.lora_A.weight"] = layer.lora_A[adapter.name].weight.detach().to("cpu", copy=True)
        peft_state[f"unet.{path}.lora_B.weight"] = layer.lora_B[adapter.name].weight.detach().to("cpu", copy=True)
    if layout == "diffusers":
        return peft_state

    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(peft_state)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        if alpha:  # diffusers writes an int64 scalar; kohya's trainer writes the weights' float type
            rank = kohya[key.removesuffix(".alpha") + ".lora_down.weight"].shape[0]
            kohya[key] = torch.tensor(float(rank), dtype=kohya[key.removesuffix(".alpha") + ".lora_down.weight"].dtype)
        else:
            del kohya[key]
    return kohya


def save_lora(
    adapter: FaceIDAdapter,
    path: str | Path,
    layout: str = "kohya",
    dtype: torch.dtype = torch.float16,
    alpha: bool = False,
) -> Path:
    """Write the identity LoRA to ``path`` (``.safetensors``) in ``layout``; fp16 like the released files.

    The file is written to a temporary name next to ``path`` and renamed, so a reader never sees half a
    file. Its header metadata says what it is (``faceid.*`` keys, plus what A1111 or diffusers read).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: LoRA files are written as .safetensors")
    state = identity_lora_state_dict(adapter, layout, alpha=alpha)
    tensors = {k: v.to(dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()}
    spec = adapter.spec
    rank = spec.lora_rank
    cad = spec.cross_attention_dim
    metadata = {
        "format": "pt",
        "faceid.content": "identity LoRA of an IP-Adapter-FaceID adapter (W x + lora_scale * up(down(x)), scale 1)",
        "faceid.variant": spec.variant,
        "faceid.base_model": spec.family,
        "faceid.lora_rank": str(rank),
        "faceid.layout": layout,
        "faceid.layers": str(len(adapter._lora_layers)),
    }
    if layout == "kohya":
        metadata["ss_network_module"] = "networks.lora"
        metadata["ss_network_dim"] = str(rank)
        metadata["ss_network_alpha"] = str(rank)  # scale 1 whether or not the file carries .alpha tensors
        if cad in _KOHYA_BASE:
            metadata["ss_base_model_version"] = _KOHYA_BASE[cad]
            metadata["modelspec.architecture"] = _MODELSPEC_ARCH[cad]
    else:
        # What diffusers' save_lora_weights writes: the LoraConfig, prefixed with the component name.
        config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(adapter._lora_layers)}
        metadata["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in config.items()}, sort_keys=True)

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path

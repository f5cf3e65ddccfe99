"""LoRA files as the ecosystem knows them: export the identity LoRA, load anyone's LoRA next to it.

Two things live here, both on top of PEFT and diffusers' own key converters (no LoRA math of our own):

* ``identity_lora_state_dict`` / ``save_lora``: the identity LoRA of an installed ``FaceIDAdapter`` as a
  standalone LoRA file, the same thing as the released ``*_lora.safetensors`` twins. The released SD1.5
  files are kohya-style (A1111/ComfyUI) with diffusers module names and **no** ``.alpha`` tensors::

      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight  [128, 320]
      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight    [320, 128]

  in fp16. Written without header metadata, exactly these tensors make a file of the size of
  ``ip-adapter-faceid_sd15_lora.safetensors`` to the byte (51,059,544, its Git LFS size); ``save_lora``
  adds a small metadata header saying what the file is. (The SDXL twins' size is not matched exactly
  by any key naming/alpha combination tried, so some detail of their header is unknown.) Kohya readers
  (A1111, ComfyUI, diffusers) take a missing alpha as scale 1, which is the FaceID LoRA's
  ``W x + up(down(x))``; ``alpha=True`` writes ``alpha = rank`` instead (the same scale, spelled out). ``layout="diffusers"`` writes diffusers/PEFT keys ``unet.<module>.lora_A.weight`` /
  ``lora_B.weight``, as ``StableDiffusionPipeline.save_lora_weights`` does.

* ``load_lora`` / ``set_lora_weight`` / ``remove_lora`` / ``list_loras``: a kohya or diffusers/PEFT LoRA
  file (SD1.5 or SDXL) loaded onto the UNet as a named PEFT adapter, next to the LoRAs already there
  (the identity LoRA included), which stay active with their weights. ``remove_lora`` puts back the
  modules, weights, active adapters and ``requires_grad`` flags it found. A file's text-encoder part goes
  onto the text encoders given (``FaceIDPipeline.load_lora`` gives the pipeline's) with the same weight;
  without them it is reported (``LoadedLora.ignored``, and a log warning).
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .atomic import atomic_path
from .checkpoints import FAMILIES, describe_unet, family_name
from .errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import FaceIDAdapter

logger = logging.getLogger(__name__)

LAYOUTS = ("kohya", "diffusers")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_REGISTRY = "_faceid_loras"  # attribute on the UNet: name -> _Record of the LoRAs load_lora put there
# Kohya/A1111 metadata names for the base model (what A1111 reads to sort LoRAs by SD version).
_KOHYA_BASE = {768: "sd_v1", 2048: "sdxl_base_v1-0"}
_MODELSPEC_ARCH = {768: "stable-diffusion-v1/lora", 2048: "stable-diffusion-xl-v1-base/lora"}


# ---------------------------------------------------------------------------------------------- export
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


# ---------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LoadedLora:
    """What ``load_lora`` put on the UNet."""

    name: str
    layout: str  # "kohya" (A1111/ComfyUI) or "diffusers" (diffusers/PEFT)
    weight: float
    modules: tuple[str, ...]  # UNet module paths that carry the LoRA
    ranks: tuple[int, ...]  # the distinct ranks in the file
    ignored: tuple[str, ...] = ()  # tensors of the file that were not applied (text encoders not given)
    text_encoder_modules: tuple[str, ...] = ()  # "<text encoder>.<module path>" that carry the LoRA


@dataclass
class PeftInjection:
    """What adding the PEFT adapter ``name`` changes on a UNet, recorded just before, so it can be undone.

    PEFT's injection (``inject_adapter_in_model`` or diffusers' ``load_lora_adapter``) wraps plain modules in
    LoRA layers, makes the new adapter the only active one on every LoRA layer of the model, flips
    ``requires_grad`` flags and creates ``unet.peft_config`` (diffusers also sets ``_hf_peft_config_loaded``).
    ``settle`` after the injection keeps every other adapter as it was; ``undo`` takes this one out again
    and leaves the rest as it finds it. The identity LoRA of ``FaceIDAdapter`` and ``load_lora`` share it.
    """

    name: str
    active: dict[str, list[str]]  # LoRA-layer path -> its active adapters, before the injection
    grad_flags: dict[int, tuple[nn.Parameter, bool]]  # by parameter object: PEFT renames what it wraps
    had_peft_config: bool
    peft_names_before: set[str]
    hf_flag: tuple[bool, object]  # whether _hf_peft_config_loaded was in the UNet's __dict__, and its value

    @classmethod
    def before(cls, unet: nn.Module, name: str) -> PeftInjection:
        _check_name(unet, name)
        return cls(
            name=name,
            active=_active_adapters(unet),
            grad_flags=_grad_flags(unet),
            had_peft_config=hasattr(unet, "peft_config"),
            peft_names_before=set(getattr(unet, "peft_config", {})),
            hf_flag=("_hf_peft_config_loaded" in unet.__dict__, unet.__dict__.get("_hf_peft_config_loaded")),
        )

    def settle(self, unet: nn.Module) -> None:
        """After the injection: the other adapters active as before and this one too where it lives, its
        weights in the dtype of the layers they adapt and frozen, every other ``requires_grad`` flag as
        before."""
        layers = _layers_with(unet, self.name)
        for path, module in _lora_layers(unet).items():
            active = [a for a in self.active.get(path, []) if a != self.name]
            module.set_adapter(active + [self.name] if path in layers else active)
        with torch.no_grad():
            for layer in layers.values():
                dtype = layer.get_base_layer().weight.dtype  # PEFT upcasts adapters to fp32; keep the UNet's
                for container in (layer.lora_A, layer.lora_B):
                    container[self.name].to(dtype)
        _restore_grad_flags(unet, self.grad_flags, new=False)

    def undo(self, unet: nn.Module) -> None:
        """Take this adapter out: a layer left with no adapter becomes its original module again; the other
        adapters keep their active state and weights; ``peft_config`` and every flag are as found."""
        active_now, flags_now = _active_adapters(unet), _grad_flags(unet)
        for path, layer in _layers_with(unet, self.name).items():
            if any(a != self.name for a in layer.scaling):  # shared with other LoRAs: take out only this one
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PEFT warns when it picks a new active adapter; set below
                    layer.delete_adapter(self.name)
            else:
                parent, _, child = path.rpartition(".")
                setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())
        for path, module in _lora_layers(unet).items():
            if path in active_now:
                module.set_adapter([a for a in active_now[path] if a != self.name and a in module.scaling])
        configs = getattr(unet, "peft_config", None)
        if configs is not None:
            configs.pop(self.name, None)
            if not self.had_peft_config and not configs:
                del unet.peft_config
        if set(getattr(unet, "peft_config", {})) <= self.peft_names_before:  # no later load relies on the flag
            had_flag, value = self.hf_flag
            if had_flag:
                unet.__dict__["_hf_peft_config_loaded"] = value
            else:
                unet.__dict__.pop("_hf_peft_config_loaded", None)
        _restore_grad_flags(unet, flags_now)


@dataclass
class _Record:
    weight: float
    injection: PeftInjection
    info: LoadedLora
    text_encoders: dict[str, tuple[nn.Module, PeftInjection]] = field(default_factory=dict)


def load_lora(
    unet: nn.Module,
    lora: str | Path | dict[str, torch.Tensor],
    name: str,
    weight: float = 1.0,
    label: str | None = None,
    text_encoders: Mapping[str, nn.Module | None] | None = None,
) -> LoadedLora:
    """Load a LoRA file (kohya or diffusers/PEFT layout, SD1.5 or SDXL) onto ``unet`` as adapter ``name``.

    ``lora`` is a ``.safetensors`` (or pickled ``.bin``/``.pt``, read with ``weights_only``) file, a
    diffusers LoRA folder, or a state dict. The LoRAs already on the UNet stay active with their
    weights; ``weight`` scales this one (``W x + weight * alpha/rank * up(down(x))``). The file's
    text-encoder part goes onto ``text_encoders`` (``{"text_encoder": ..., "text_encoder_2": ...}``) with the
    same weight, as A1111 and ComfyUI apply it; without them it is reported in ``ignored``. Raises
    ``CheckpointError`` for an unreadable file, a file that is not a LoRA, a LoRA made for another base
    model (naming the layer and the sizes), or a name already in use; nothing is left loaded then.
    """
    label = label or (Path(lora).name if isinstance(lora, (str, Path)) else "LoRA state dict")
    _check_name(unet, name)
    raw, metadata = _read_lora(lora, label)
    layout, unet_state, alphas, text_state, text_alphas = _to_peft(unet, raw, label)
    metadata = _unet_metadata(metadata, prefixed=any(k.startswith("unet.") for k in raw))
    if not unet_state:
        raise CheckpointError(
            f"{label} has no UNet weights (only {len(text_state)} text-encoder tensors); faceid needs a UNet LoRA"
        )
    modules = _check_fits(unet, unet_state, label)
    encoders = {p: m for p, m in (text_encoders or {}).items() if m is not None}
    ignored = sorted(k for k in text_state if k.split(".", 1)[0] not in encoders)
    if ignored:
        logger.warning("%s: %d text-encoder tensors are not applied (no text encoder given)", label, len(ignored))

    injection = PeftInjection.before(unet, name)
    try:
        with warnings.catch_warnings():
            # Several adapters on one model is the point here, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.load_lora_adapter(
                {f"unet.{k}": v for k, v in unet_state.items()},
                prefix="unet",
                network_alphas=alphas or None,
                adapter_name=name,
                metadata=metadata,
            )
    except Exception as exc:
        injection.undo(unet)
        raise CheckpointError(f"{label} could not be loaded as a LoRA: {type(exc).__name__}: {exc}") from exc
    _set_weight(unet, name, weight)
    injection.settle(unet)

    loaded_text: dict[str, tuple[nn.Module, PeftInjection]] = {}
    try:
        for prefix, encoder in encoders.items():
            part = {k: v for k, v in text_state.items() if k.startswith(f"{prefix}.")}
            if part:
                loaded_text[prefix] = (
                    encoder,
                    _load_text_encoder_lora(encoder, prefix, part, text_alphas, name, label),
                )
                _set_weight(encoder, name, weight)
    except CheckpointError:
        for encoder, text_injection in loaded_text.values():
            text_injection.undo(encoder)
        injection.undo(unet)
        raise

    ranks = sorted({t.shape[0] for k, t in unet_state.items() if k.endswith(".lora_A.weight")})
    text_modules = tuple(
        f"{p}.{path}" for p, (encoder, _) in loaded_text.items() for path in _layers_with(encoder, name)
    )
    info = LoadedLora(name, layout, float(weight), tuple(modules), tuple(ranks), tuple(ignored), text_modules)
    _registry(unet)[name] = _Record(float(weight), injection, info, loaded_text)
    return info


def _load_text_encoder_lora(
    encoder: nn.Module, prefix: str, part: dict, alphas: dict, name: str, label: str
) -> PeftInjection:
    """One text encoder's part of a LoRA, through diffusers' own loader once the names are ones it reads;
    refused (and taken out again) unless every one of its layers found its module."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_DIFFUSERS, convert_state_dict

    # diffusers' kohya converter names text-encoder attention LoRAs the old way (``self_attn.to_q_lora.down``)
    # and its loader recognises that only when an ``out_proj`` LoRA is present: rename them here, alphas too,
    # and drop the ``text_model.`` level that flattened (transformers 5) CLIP text models no longer have.
    flat = not hasattr(encoder, "text_model")

    def rename(entries: dict) -> dict:
        renamed = convert_state_dict(dict(entries), DIFFUSERS_OLD_TO_DIFFUSERS)
        return {k.replace(f"{prefix}.text_model.", f"{prefix}.") if flat else k: v for k, v in renamed.items()}

    part = rename(part)
    alphas = rename({k: v for k, v in alphas.items() if k.startswith(f"{prefix}.")})
    wanted = sum(key.endswith(("down.weight", "lora_A.weight")) for key in part)  # one per adapted layer
    injection = PeftInjection.before(encoder, name)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            StableDiffusionPipeline.load_lora_into_text_encoder(
                part, alphas or None, encoder, prefix=prefix, lora_scale=1.0, adapter_name=name
            )
        found = len(_layers_with(encoder, name))
        if found < wanted:
            raise ValueError(f"{wanted} LoRA layers for {prefix}, {found} of them found in the model")
    except Exception as exc:
        injection.undo(encoder)
        raise CheckpointError(
            f"{label}: its {prefix} part does not fit this model's {prefix}: {type(exc).__name__}: {exc}"
        ) from exc
    injection.settle(encoder)
    return injection


def set_lora_weight(unet: nn.Module, name: str, weight: float) -> None:
    """Change the weight of LoRA ``name`` without reloading it (0 turns it off, bit for bit).

    For the identity LoRA of a ``FaceIDAdapter``, use ``adapter.set_lora_scale`` so the adapter knows.
    """
    layers = _layers_with(unet, name)
    if not layers:
        raise KeyError(f"no LoRA named {name!r} on this UNet (loaded: {', '.join(list_loras(unet)) or 'none'})")
    if any(name in layer.merged_adapters for layer in layers.values()):
        raise RuntimeError(f"LoRA {name!r} is fused into the UNet's weights; unfuse it before changing its weight")
    _set_weight(unet, name, weight)
    record = _registry(unet, create=False).get(name)
    if record is not None:  # loaded by load_lora: its text-encoder part takes the same weight
        for encoder, _ in record.text_encoders.values():
            _set_weight(encoder, name, weight)
        record.weight = float(weight)


def remove_lora(unet: nn.Module, name: str) -> None:
    """Take out LoRA ``name`` (loaded with ``load_lora``), leaving the UNet exactly as ``load_lora`` found it.

    Modules that PEFT wrapped only for this LoRA get their original module back; on layers shared with
    other LoRAs only this adapter is deleted. The other LoRAs keep their active state and weights, and
    every ``requires_grad`` flag stays as it is.
    """
    registry = _registry(unet, create=False)
    if name not in registry:
        loaded = ", ".join(registry) or "none"
        raise KeyError(
            f"no LoRA named {name!r} was loaded with load_lora (loaded: {loaded}); "
            "an identity LoRA goes with its FaceIDAdapter.remove()"
        )
    record = registry[name]
    layers = _layers_with(unet, name)
    if any(name in layer.merged_adapters for layer in layers.values()):
        raise RuntimeError(f"LoRA {name!r} is fused into the UNet's weights; unfuse it before removing it")
    del registry[name]
    record.injection.undo(unet)
    for encoder, text_injection in record.text_encoders.values():
        text_injection.undo(encoder)
    if not registry:
        unet.__dict__.pop(_REGISTRY, None)


def list_loras(unet: nn.Module) -> dict[str, float]:
    """Every LoRA adapter on the UNet (the identity LoRA included) and its weight, in loading order."""
    registry = _registry(unet, create=False)
    weights: dict[str, float] = {}
    for module in _lora_layers(unet).values():
        for adapter_name in module.scaling:
            if adapter_name in weights:
                continue
            if adapter_name in registry:
                weights[adapter_name] = registry[adapter_name].weight
            else:  # loaded by someone else (the FaceID adapter, diffusers): read the scale off PEFT
                r, lora_alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
                base = lora_alpha / math.sqrt(r) if module.use_rslora.get(adapter_name, False) else lora_alpha / r
                weights[adapter_name] = module.scaling[adapter_name] / base
    order = list(getattr(unet, "peft_config", {}))
    return dict(sorted(weights.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


# ---------------------------------------------------------------------------------------------- helpers
def _registry(unet: nn.Module, create: bool = True) -> dict[str, _Record]:
    registry = unet.__dict__.get(_REGISTRY)
    if registry is None:
        registry = {}
        if create:
            unet.__dict__[_REGISTRY] = registry
    return registry


def _set_weight(model: nn.Module, name: str, weight: float) -> None:
    """The weight of adapter ``name`` on every layer of ``model`` that carries it."""
    for layer in _layers_with(model, name).values():
        layer.set_scale(name, float(weight))


def _layers_with(unet: nn.Module, name: str) -> dict[str, nn.Module]:
    return {path: m for path, m in _lora_layers(unet).items() if name in m.scaling}


def _check_name(unet: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"a LoRA name must be a non-empty string without '.', got {name!r}")
    if name in getattr(unet, "peft_config", {}) or _layers_with(unet, name):
        raise CheckpointError(
            f"a LoRA named {name!r} is already loaded on this UNet; remove it first or choose another name "
            f"(loaded: {', '.join(list_loras(unet))})"
        )


def _read_lora(lora: str | Path | dict, label: str) -> tuple[dict[str, torch.Tensor], dict | None]:
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
) -> tuple[str, dict[str, torch.Tensor], dict[str, float], list[str]]:
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
    if unet_part and not all(_PEFT_KEY.match(k) for k in unet_part):
        unet_part = convert_unet_state_dict_to_peft(unet_part)  # older diffusers names (``.lora.down.weight``)
    unsupported = [k for k in unet_part if not _PEFT_KEY.match(k)]
    if unsupported:
        raise CheckpointError(
            f"{label}: unsupported LoRA tensors (only plain LoRA down/up pairs are supported), "
            f"e.g. {', '.join(unsupported[:3])}"
        )
    text_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(_TEXT_ENCODER_PREFIXES)}
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    return layout, unet_part, alphas, text_part, text_alphas


def _check_fits(unet: nn.Module, state: dict[str, torch.Tensor], label: str) -> list[str]:
    """Refuse a LoRA whose layers this UNet lacks or has at other sizes; returns the module paths."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    unet_cad = unet.config.cross_attention_dim
    cross_layers = sum(1 for n in unet.attn_processors if ".attn2." in n)
    unet_desc = describe_unet(unet_cad, cross_layers)

    def refuse(detail: str) -> None:
        hint = _guess_base(pairs)
        raise CheckpointError(
            f"{label} does not fit this base model ({unet_desc}): {detail}"
            + (f" The LoRA looks made for {hint}." if hint else "")
        )

    missing = []
    for path, parts in sorted(pairs.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{label}: layer {path} has {' and '.join(sorted(parts))} but not both LoRA halves")
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            missing.append(path)
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        down, up = parts["lora_A"], parts["lora_B"]
        if isinstance(base, nn.Linear):
            sizes = (base.in_features, base.out_features)
        elif isinstance(base, nn.Conv2d):
            sizes = (base.in_channels, base.out_channels)
        else:
            raise CheckpointError(f"{label}: layer {path} is a {type(base).__name__}, which LoRA cannot adapt here")
        lora_sizes = (down.shape[1] if down.ndim > 1 else -1, up.shape[0])
        if lora_sizes != sizes or up.ndim < 2 or up.shape[1] != down.shape[0]:
            refuse(
                f"its LoRA for layer {path} is {lora_sizes[0]}->{lora_sizes[1]} (rank {down.shape[0]}), "
                f"this UNet's layer is {sizes[0]}->{sizes[1]}."
            )
    if missing:
        refuse(
            f"{len(missing)} of its {len(pairs)} LoRA layers do not exist in this UNet (e.g. {', '.join(missing[:2])})."
        )
    return sorted(pairs)


def _guess_base(pairs: dict[str, dict[str, torch.Tensor]]) -> str:
    """The base model family a LoRA was made for, from the context width of its cross-attention keys."""
    widths = {
        parts["lora_A"].shape[1]
        for path, parts in pairs.items()
        if path.endswith(("attn2.to_k", "attn2.to_v")) and "lora_A" in parts and parts["lora_A"].ndim == 2
    }
    if len(widths) != 1:
        return ""
    width = widths.pop()
    return f"{FAMILIES[width]} (cross-attention dim {width})" if width in FAMILIES else family_name(width)


def _grad_flags(unet: nn.Module) -> dict[int, tuple[nn.Parameter, bool]]:
    """``requires_grad`` of every parameter, by parameter object: PEFT renames the ones it wraps."""
    return {id(p): (p, p.requires_grad) for p in unet.parameters()}


def _restore_grad_flags(unet: nn.Module, flags: dict[int, tuple[nn.Parameter, bool]], new: bool | None = None) -> None:
    """Put the recorded flags back; parameters not in the record get ``new`` (None: left alone)."""
    for param in unet.parameters():
        if id(param) in flags:
            param.requires_grad_(flags[id(param)][1])
        elif new is not None:
            param.requires_grad_(new)


def _lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _active_adapters(unet: nn.Module) -> dict[str, list[str]]:
    return {path: list(m.active_adapters) for path, m in _lora_layers(unet).items()}

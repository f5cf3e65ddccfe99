"""User LoRAs (a style, a character...) stacked on a UNet next to the identity LoRA, each with its own weight.

A :class:`LoraStack` belongs to one UNet (and, optionally, the text encoders of its pipeline); it loads
a kohya or diffusers/PEFT LoRA file (SD1.5 or SDXL) as a named PEFT adapter next to the LoRAs already
there (the identity LoRA included), which stay active with their weights, changes its weight, and takes
it out again, putting back the modules, weights, active adapters and ``requires_grad`` flags it found.
A file's text-encoder part goes onto the stack's text encoders with the same weight, as A1111 and
ComfyUI apply it; without them it is reported (``LoadedLora.ignored``, and a log warning).
``FaceIDPipeline`` owns one (its ``load_lora`` / ``set_lora_weight`` / ``remove_lora`` / ``loras``); for a
bare UNet, make one: ``LoraStack(unet).load("style.safetensors", weight=0.7)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import FAMILIES, describe_unet, family_name
from ..errors import CheckpointError
from ..peft_adapters import (
    PeftInjection,
    adapter_name_taken,
    adapter_weights,
    get_base_layer,
    layers_with,
    set_adapter_active,
    set_adapter_weight,
)
from ..weights import weights_guard
from .files import PEFT_KEY, read_lora

__all__ = ["LoadedLora", "LoraStack"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLora:
    """What :meth:`LoraStack.load` put on the UNet."""

    name: str
    layout: str  # "kohya" (A1111/ComfyUI) or "diffusers" (diffusers/PEFT)
    weight: float
    modules: tuple[str, ...]  # UNet module paths that carry the LoRA
    ranks: tuple[int, ...]  # the distinct ranks in the file
    ignored: tuple[str, ...] = ()  # tensors of the file that were not applied (text encoders not given)
    text_encoder_modules: tuple[str, ...] = ()  # "<text encoder>.<module path>" that carry the LoRA
    source: str | None = None  # the file or folder it was loaded from (None for a state dict)


@dataclass
class _Record:
    weight: float
    injection: PeftInjection
    info: LoadedLora
    text_encoders: dict[str, tuple[nn.Module, PeftInjection]] = field(default_factory=dict)
    active: bool = True


class LoraStack:
    """The user LoRAs on ``unet`` (and their text-encoder parts on ``text_encoders``), by name.

    ``text_encoders``: ``{"text_encoder": ..., "text_encoder_2": ...}`` of the UNet's pipeline (None
    entries are left out). LoRAs that others put on the UNet (the identity LoRA of a ``FaceIDAdapter``,
    diffusers' loader) are listed and can be re-weighted, but only the stack's own can be removed.
    """

    def __init__(self, unet: nn.Module, text_encoders: Mapping[str, nn.Module | None] | None = None) -> None:
        self.unet = unet
        self.text_encoders = {key: m for key, m in (text_encoders or {}).items() if m is not None}
        self._records: dict[str, _Record] = {}

    def load(
        self,
        lora: str | Path | dict[str, torch.Tensor],
        name: str | None = None,
        weight: float = 1.0,
        label: str | None = None,
    ) -> LoadedLora:
        """Load a LoRA (kohya or diffusers/PEFT layout, SD1.5 or SDXL) as adapter ``name``.

        ``lora`` is a ``.safetensors`` (or pickled ``.bin``/``.pt``, read with ``weights_only``) file, a
        diffusers LoRA folder, or a state dict; ``name`` defaults to the file name without suffix. The
        LoRAs already on the UNet stay active with their weights; ``weight`` scales this one
        (``W x + weight * alpha/rank * up(down(x))``), on the UNet and on the text encoders alike.
        ``label`` names the LoRA in messages (default: the file name). Raises ``CheckpointError`` for an
        unreadable file, a file that is not a LoRA, a LoRA made for another base model (naming the layer
        and the sizes), or a name already in use; nothing is left loaded then.
        """
        with weights_guard(self.unet).exclusive():
            return self._load(lora, name, weight, label)

    def _load(
        self, lora: str | Path | dict[str, torch.Tensor], name: str | None, weight: float, label: str | None
    ) -> LoadedLora:
        is_path = isinstance(lora, (str, Path))
        if name is None:
            if not is_path:
                raise ValueError("give a name for a LoRA loaded from a state dict")
            name = Path(lora).stem
        label = label or (Path(lora).name if is_path else "LoRA state dict")
        unet = self.unet
        self._check_name(unet, name)
        lora_file = read_lora(lora, unet, label)
        if not lora_file.unet:
            raise CheckpointError(
                f"{label} has no UNet weights (only {len(lora_file.text)} text-encoder tensors); "
                "faceid needs a UNet LoRA"
            )
        modules = _check_fits(unet, lora_file.unet, label)
        encoders = self.text_encoders
        ignored = sorted(k for k in lora_file.text if k.split(".", 1)[0] not in encoders)
        if ignored:
            logger.warning("%s: %d text-encoder tensors are not applied (no text encoder given)", label, len(ignored))

        injection = PeftInjection.before(unet, name)
        try:
            with warnings.catch_warnings():
                # Several adapters on one model is the point here, not an accident.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                unet.load_lora_adapter(
                    {f"unet.{k}": v for k, v in lora_file.unet.items()},
                    prefix="unet",
                    network_alphas=lora_file.unet_alphas or None,
                    adapter_name=name,
                    metadata=lora_file.unet_metadata,
                )
        except Exception as exc:
            injection.undo(unet)
            raise CheckpointError(f"{label} could not be loaded as a LoRA: {type(exc).__name__}: {exc}") from exc
        set_adapter_weight(unet, name, weight)
        injection.settle(unet)

        loaded_text: dict[str, tuple[nn.Module, PeftInjection]] = {}
        try:
            for prefix, encoder in encoders.items():
                part = {k: v for k, v in lora_file.text.items() if k.startswith(f"{prefix}.")}
                if part:
                    self._check_name(encoder, name)
                    loaded_text[prefix] = (
                        encoder,
                        _load_text_encoder_lora(encoder, prefix, part, lora_file.text_alphas, name, label),
                    )
                    set_adapter_weight(encoder, name, weight)
        except CheckpointError:
            for encoder, text_injection in loaded_text.values():
                text_injection.undo(encoder)
            injection.undo(unet)
            raise

        ranks = sorted({t.shape[0] for k, t in lora_file.unet.items() if k.endswith(".lora_A.weight")})
        text_modules = tuple(
            f"{p}.{path}" for p, (encoder, _) in loaded_text.items() for path in layers_with(encoder, name)
        )
        info = LoadedLora(
            name,
            lora_file.layout,
            float(weight),
            tuple(modules),
            tuple(ranks),
            tuple(ignored),
            text_modules,
            str(lora) if is_path else None,
        )
        self._records[name] = _Record(float(weight), injection, info, loaded_text)
        return info

    def set_weight(self, name: str, weight: float) -> None:
        """Change the weight of LoRA ``name`` without reloading it (0 turns it off, bit for bit).

        Any LoRA on the UNet; one this stack loaded changes on its text encoders too. For the identity
        LoRA of a ``FaceIDAdapter``, use ``adapter.set_lora_scale`` so the adapter knows.
        """
        layers = layers_with(self.unet, name)
        if not layers:
            loaded = ", ".join(self.list()) or "none"
            raise KeyError(f"no LoRA named {name!r} on this UNet (loaded: {loaded})")
        if any(name in layer.merged_adapters for layer in layers.values()):
            raise RuntimeError(f"LoRA {name!r} is fused into the UNet's weights; unfuse it before changing its weight")
        with weights_guard(self.unet).exclusive():
            set_adapter_weight(self.unet, name, weight)
            record = self._records.get(name)
            if record is not None:  # its text-encoder part takes the same weight
                for encoder, _ in record.text_encoders.values():
                    set_adapter_weight(encoder, name, weight)
                record.weight = float(weight)

    def set_active(self, name: str, active: bool) -> None:
        """Switch LoRA ``name`` (one this stack loaded) out of the forward passes and back in, its weight kept:
        an inactive LoRA costs nothing, where one at weight 0 is still computed."""
        record = self._records[name]
        with weights_guard(self.unet).exclusive():
            set_adapter_active(self.unet, name, active)
            for encoder, _ in record.text_encoders.values():
                set_adapter_active(encoder, name, active)
            record.active = bool(active)

    def put_in_force(self, name: str, weight: float, active: bool = True) -> None:
        """Put LoRA ``name`` (loaded by this stack) on the UNet at ``weight``, active or not, leaving the recorded
        setting (``list``, ``sources``) as it is: for a call that holds the UNet's ``weights_guard``, which puts
        the setting back after it (``put_in_force(name, record weight, record active)``)."""
        set_adapter_active(self.unet, name, active)
        set_adapter_weight(self.unet, name, weight)

    def setting(self, name: str) -> tuple[float, bool]:
        """The weight and active state recorded for LoRA ``name`` (loaded by this stack)."""
        record = self._records[name]
        return record.weight, record.active

    def remove(self, name: str) -> None:
        """Take out LoRA ``name`` (loaded by this stack), leaving the models exactly as ``load`` found them.

        Modules that PEFT wrapped only for this LoRA get their original module back; on layers shared with
        other LoRAs only this adapter is deleted. The other LoRAs keep their active state and weights, and
        every ``requires_grad`` flag stays as it is.
        """
        if name not in self._records:
            loaded = ", ".join(self._records) or "none"
            raise KeyError(
                f"no LoRA named {name!r} was loaded with load_lora (loaded: {loaded}); "
                "an identity LoRA goes with its FaceIDAdapter.remove()"
            )
        record = self._records[name]
        if any(name in layer.merged_adapters for layer in layers_with(self.unet, name).values()):
            raise RuntimeError(f"LoRA {name!r} is fused into the UNet's weights; unfuse it before removing it")
        with weights_guard(self.unet).exclusive():
            del self._records[name]
            record.injection.undo(self.unet)
            for encoder, text_injection in record.text_encoders.values():
                text_injection.undo(encoder)

    def list(self) -> dict[str, float]:
        """Every LoRA adapter on the UNet (the identity LoRA included) and its weight, in loading order."""
        weights = adapter_weights(self.unet)
        return {name: self._records[name].weight if name in self._records else w for name, w in weights.items()}

    def sources(self) -> dict[str, float]:
        """The LoRAs this stack loaded, by the file they came from (their name for a state dict), with weights."""
        return {record.info.source or name: record.weight for name, record in self._records.items()}

    def _check_name(self, model: nn.Module, name: str) -> None:
        if adapter_name_taken(model, name):
            raise CheckpointError(
                f"a LoRA named {name!r} is already loaded on this UNet; remove it first or choose another name "
                f"(loaded: {', '.join(self.list())})"
            )


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
        found = len(layers_with(encoder, name))
        if found < wanted:
            raise ValueError(f"{wanted} LoRA layers for {prefix}, {found} of them found in the model")
    except Exception as exc:
        injection.undo(encoder)
        raise CheckpointError(
            f"{label}: its {prefix} part does not fit this model's {prefix}: {type(exc).__name__}: {exc}"
        ) from exc
    injection.settle(encoder)
    return injection


def _check_fits(unet: nn.Module, state: dict[str, torch.Tensor], label: str) -> list[str]:
    """Refuse a LoRA whose layers this UNet lacks or has at other sizes; returns the module paths."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = PEFT_KEY.match(key)
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
        base = get_base_layer(module)
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

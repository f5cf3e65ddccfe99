"""Named PEFT LoRA adapters on a model (a UNet, a text encoder): where they are, their weights, and how to
take one out again exactly.

Bookkeeping only, on top of PEFT's LoRA layers; this module imports nothing from faceid, so both the
identity adapter (:mod:`faceid.adapter`) and the user-LoRA stack (:mod:`faceid.lora`) build on it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "PeftInjection",
    "adapter_weights",
    "adapter_name_taken",
    "get_base_layer",
    "layers_with",
    "lora_layers",
    "set_adapter_active",
    "set_adapter_weight",
    "set_layer_weight",
    "tensor_scalings",
]


def get_base_layer(module: nn.Module) -> nn.Module:
    """The plain layer under a PEFT wrapper (``module`` itself when it is not wrapped)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA layer of ``model``, by module path."""
    from peft.tuners.lora import LoraLayer

    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def layers_with(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The LoRA layers of ``model`` that carry adapter ``name``."""
    return {path: m for path, m in lora_layers(model).items() if name in m.scaling}


def set_layer_weight(layer: nn.Module, name: str, weight: float) -> None:
    """PEFT's ``set_scale`` of adapter ``name`` on one LoRA layer, written into its scaling tensor in place when
    it has one (``tensor_scalings``), so that a compiled model reads the new value instead of recompiling."""
    current = layer.scaling.get(name)
    layer.set_scale(name, float(weight))  # PEFT's formula (alpha / r, or / sqrt(r) for rsLoRA); sets a float
    if isinstance(current, torch.Tensor):
        layer.scaling[name] = current.fill_(layer.scaling[name])


def set_adapter_weight(model: nn.Module, name: str, weight: float) -> None:
    """The weight of adapter ``name`` on every layer of ``model`` that carries it."""
    for layer in layers_with(model, name).values():
        set_layer_weight(layer, name, weight)


def tensor_scalings(model: nn.Module) -> None:
    """Hold every LoRA weight of ``model`` (PEFT's ``scaling``, a Python float) in a float32 0-d tensor on its
    layer's device, changed in place from then on (``set_layer_weight``).

    For a compiled model: TorchDynamo specialises on Python numbers, so a new LoRA weight (or the identity
    window switching the identity LoRA) would recompile the graph, while a tensor is read as an input (as
    PEFT's ``prepare_model_for_compiled_hotswap`` does). Values are kept exactly; a tensor on another device
    is moved (a new object, so the next call recompiles once).
    """
    for layer in lora_layers(model).values():
        device = layer.get_base_layer().weight.device
        for name, value in layer.scaling.items():
            if not isinstance(value, torch.Tensor):
                layer.scaling[name] = torch.tensor(float(value), dtype=torch.float32, device=device)
            elif value.device != device:
                layer.scaling[name] = value.to(device)


def set_adapter_active(model: nn.Module, name: str, active: bool) -> None:
    """Whether adapter ``name`` takes part in ``model``'s forward passes, on every layer that carries it.

    An inactive adapter costs nothing (PEFT skips it; at weight 0 it would still be computed). The other
    adapters stay as they are, and so does every ``requires_grad`` flag: PEFT's ``set_adapter`` (the layer's
    public way to choose its active adapters) also makes the adapters it activates trainable and freezes the
    others, so the layer's flags are put back after it.
    """
    for layer in layers_with(model, name).values():
        current = list(layer.active_adapters)
        if active and name not in current:
            wanted = [*current, name]
        elif not active and name in current:
            wanted = [n for n in current if n != name]
        else:
            continue
        flags = _grad_flags(layer)
        layer.set_adapter(wanted)
        _restore_grad_flags(layer, flags)


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """Every LoRA adapter on ``model`` and its weight (read off PEFT's scaling), in loading order."""
    weights: dict[str, float] = {}
    for module in lora_layers(model).values():
        for name in module.scaling:
            if name in weights:
                continue
            r, lora_alpha = module.r[name], module.lora_alpha[name]
            base = lora_alpha / math.sqrt(r) if module.use_rslora.get(name, False) else lora_alpha / r
            weights[name] = float(module.scaling[name]) / base
    order = list(getattr(model, "peft_config", {}))
    return dict(sorted(weights.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def adapter_name_taken(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is already taken on ``model``; ``ValueError`` when it is no usable adapter name."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"a LoRA name must be a non-empty string without '.', got {name!r}")
    return name in getattr(model, "peft_config", {}) or bool(layers_with(model, name))


@dataclass
class PeftInjection:
    """What adding the PEFT adapter ``name`` changes on a model, recorded just before, so it can be undone.

    PEFT's injection (``inject_adapter_in_model`` or diffusers' ``load_lora_adapter``) wraps plain modules in
    LoRA layers, makes the new adapter the only active one on every LoRA layer of the model, flips
    ``requires_grad`` flags and creates ``model.peft_config`` (diffusers also sets ``_hf_peft_config_loaded``).
    ``settle`` after the injection keeps every other adapter as it was; ``undo`` takes this one out again
    and leaves the rest as it finds it. The identity LoRA of ``FaceIDAdapter`` and the user LoRAs of
    ``LoraStack`` share it.
    """

    name: str
    active: dict[str, list[str]]  # LoRA-layer path -> its active adapters, before the injection
    grad_flags: dict[int, tuple[nn.Parameter, bool]]  # by parameter object: PEFT renames what it wraps
    had_peft_config: bool
    peft_names_before: set[str]
    hf_flag: tuple[bool, object]  # whether _hf_peft_config_loaded was in the model's __dict__, and its value

    @classmethod
    def before(cls, model: nn.Module, name: str) -> PeftInjection:
        """Record ``model`` before adapter ``name`` is injected (the caller has checked that the name is free)."""
        return cls(
            name=name,
            active=_active_adapters(model),
            grad_flags=_grad_flags(model),
            had_peft_config=hasattr(model, "peft_config"),
            peft_names_before=set(getattr(model, "peft_config", {})),
            hf_flag=("_hf_peft_config_loaded" in model.__dict__, model.__dict__.get("_hf_peft_config_loaded")),
        )

    def settle(self, model: nn.Module) -> None:
        """After the injection: the other adapters active as before and this one too where it lives, its
        weights in the dtype of the layers they adapt and frozen, every other ``requires_grad`` flag as
        before."""
        layers = layers_with(model, self.name)
        for path, module in lora_layers(model).items():
            active = [a for a in self.active.get(path, []) if a != self.name]
            module.set_adapter(active + [self.name] if path in layers else active)
        with torch.no_grad():
            for layer in layers.values():
                dtype = layer.get_base_layer().weight.dtype  # PEFT upcasts adapters to fp32; keep the model's
                for container in (layer.lora_A, layer.lora_B):
                    container[self.name].to(dtype)
        _restore_grad_flags(model, self.grad_flags, new=False)

    def undo(self, model: nn.Module) -> None:
        """Take this adapter out: a layer left with no adapter becomes its original module again; the other
        adapters keep their active state and weights; ``peft_config`` and every flag are as found."""
        active_now, flags_now = _active_adapters(model), _grad_flags(model)
        for path, layer in layers_with(model, self.name).items():
            if any(a != self.name for a in layer.scaling):  # shared with other LoRAs: take out only this one
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PEFT warns when it picks a new active adapter; set below
                    layer.delete_adapter(self.name)
            else:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
        for path, module in lora_layers(model).items():
            if path in active_now:
                module.set_adapter([a for a in active_now[path] if a != self.name and a in module.scaling])
        configs = getattr(model, "peft_config", None)
        if configs is not None:
            configs.pop(self.name, None)
            if not self.had_peft_config and not configs:
                del model.peft_config
        if set(getattr(model, "peft_config", {})) <= self.peft_names_before:  # no later load relies on the flag
            had_flag, value = self.hf_flag
            if had_flag:
                model.__dict__["_hf_peft_config_loaded"] = value
            else:
                model.__dict__.pop("_hf_peft_config_loaded", None)
        _restore_grad_flags(model, flags_now)


def _grad_flags(model: nn.Module) -> dict[int, tuple[nn.Parameter, bool]]:
    """``requires_grad`` of every parameter, by parameter object: PEFT renames the ones it wraps."""
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def _restore_grad_flags(model: nn.Module, flags: dict[int, tuple[nn.Parameter, bool]], new: bool | None = None) -> None:
    """Put the recorded flags back; parameters not in the record get ``new`` (None: left alone)."""
    for param in model.parameters():
        if id(param) in flags:
            param.requires_grad_(flags[id(param)][1])
        elif new is not None:
            param.requires_grad_(new)


def _active_adapters(model: nn.Module) -> dict[str, list[str]]:
    return {path: list(m.active_adapters) for path, m in lora_layers(model).items()}

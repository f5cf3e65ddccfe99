"""The identity adapter installed in a diffusers UNet: projection, decoupled cross-attention, LoRA.

``FaceIDAdapter.install(unet, checkpoint)`` checks that the checkpoint fits the UNet, then

* replaces the processor of every cross-attention layer with a ``FaceIDAttnProcessor`` that carries
  that layer's ``to_k_ip``/``to_v_ip``;
* adds the identity LoRA (if the checkpoint has one) on ``to_q``/``to_k``/``to_v``/``to_out.0`` of every
  attention layer through PEFT, as a named adapter next to any LoRA the user already has;
* builds the ``IdentityProjection`` that turns face embeddings into identity tokens.

The returned handle changes ``scale`` and ``lora_scale`` without reloading, can fuse the LoRA into the
base weights, and ``remove()`` puts back the exact processor objects, modules and weights it found.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .attention import DecoupledBranch, FaceIDAttnProcessor
from .checkpoints import FAMILIES, LORA_TARGETS, AdapterSpec, describe_unet, family_name, load_state_dict
from .errors import CheckpointError, FaceIDError
from .peft_adapters import PeftInjection, adapter_name_taken, adapter_weights, get_base_layer, set_layer_weight
from .projection import IdentityProjection
from .weights import weights_guard

StateDict = dict[str, dict[str, torch.Tensor]]


def _attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module path, Attention module) in ``unet.attn_processors`` order: the checkpoint's numbering."""
    return [
        (name.removesuffix(".processor"), unet.get_submodule(name.removesuffix(".processor")))
        for name in unet.attn_processors
    ]


def _module_target(target: str) -> str:
    return "to_out.0" if target == "to_out" else target


class FaceIDAdapter:
    """An IP-Adapter-FaceID installed in a UNet. Create it with ``FaceIDAdapter.install``."""

    def __init__(self, unet: nn.Module, spec: AdapterSpec, name: str):
        self.unet = unet
        self.spec = spec
        self.name = name
        self.projection: IdentityProjection | None = None
        self.processors: dict[str, FaceIDAttnProcessor] = {}
        self.branches: dict[str, DecoupledBranch] = {}  # module path -> this adapter's branch in its processor
        self._original_processors: dict[str, object] = {}
        self._lora_layers: list[str] = []  # module paths of the PEFT layers that hold our LoRA
        self._peft: PeftInjection | None = None  # how to take the LoRA out again
        self._fused_weights: dict[str, torch.Tensor] | None = None
        # The user's settings: the defaults of every call. A call's own values live in the call (its token
        # groups, and its LoRA weight under the UNet's weights guard), never here.
        self._scale = 1.0
        self._lora_scale = 1.0
        self._active = True

    # ------------------------------------------------------------------ install / remove
    @classmethod
    def install(
        cls,
        unet: nn.Module,
        checkpoint: str | Path | StateDict,
        scale: float = 1.0,
        lora_scale: float = 1.0,
        name: str = "faceid",
        label: str | None = None,
    ) -> FaceIDAdapter:
        """Load ``checkpoint`` (a path in either official layout, or its state dict) into ``unet``.

        ``label`` names the checkpoint in error messages (default: the file name).
        """
        label = label or (Path(checkpoint).name if isinstance(checkpoint, (str, Path)) else "checkpoint")
        state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        spec = AdapterSpec.from_state_dict(state, label)
        layers = _attention_layers(unet)
        check_fits(spec, unet, layers, label)
        if any(isinstance(p, FaceIDAttnProcessor) for p in unet.attn_processors.values()):
            raise CheckpointError("this UNet already has a FaceID adapter installed; remove() it first")

        adapter = cls(unet, spec, name)
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype

        projection = IdentityProjection(
            spec.cross_attention_dim, spec.num_tokens, spec.id_dim, spec.hidden_dim, spec.perceiver
        )
        load_strict(projection, state["image_proj"], f"{label} image_proj")
        adapter.projection = projection.to(device=device, dtype=dtype).eval().requires_grad_(False)

        adapter._original_processors = dict(unet.attn_processors)
        new_processors = dict(adapter._original_processors)
        for index, (path, attn) in enumerate(layers):
            if index not in spec.ip_layers:
                continue
            processor = FaceIDAttnProcessor.for_layer(attn, scale, name)
            branch = processor.branches[name]
            load_strict(
                branch,
                {
                    "to_k_ip.weight": state["ip_adapter"][f"{index}.to_k_ip.weight"],
                    "to_v_ip.weight": state["ip_adapter"][f"{index}.to_v_ip.weight"],
                },
                f"{label} ip_adapter.{index}",
            )
            processor.to(device=device, dtype=dtype).requires_grad_(False)
            new_processors[f"{path}.processor"] = processor
            adapter.processors[path] = processor
            adapter.branches[path] = branch
        unet.set_attn_processor(new_processors)

        if spec.lora_rank:
            adapter._install_lora(layers, state["ip_adapter"])
        adapter.set_scale(scale)
        adapter.set_lora_scale(lora_scale)
        return adapter

    def _install_lora(self, layers: list[tuple[str, nn.Module]], weights: dict[str, torch.Tensor]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        rank = self.spec.lora_rank
        targets = {}
        for index, per_target in self.spec.lora_layers.items():
            path = layers[index][0]
            for target in per_target:
                targets[f"{path}.{_module_target(target)}"] = (index, target)
        if adapter_name_taken(self.unet, self.name):
            raise CheckpointError(
                f"a LoRA named {self.name!r} is already loaded on this UNet; remove it first or choose another name "
                f"(loaded: {', '.join(adapter_weights(self.unet))})"
            )
        self._peft = PeftInjection.before(self.unet, self.name)
        # lora_alpha == r gives PEFT scaling 1: the reference's LoRALinearLayer with network_alpha None.
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
        with warnings.catch_warnings():
            # A user's LoRA next to the identity LoRA is intended, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, self.unet, adapter_name=self.name)
        self._peft.settle(self.unet)
        with torch.no_grad():
            for path, (index, target) in targets.items():
                layer = self.unet.get_submodule(path)
                for module, key in ((layer.lora_A, "down"), (layer.lora_B, "up")):
                    module[self.name].weight.copy_(weights[f"{index}.{target}_lora.{key}.weight"])
        self._lora_layers = list(targets)

    def remove(self) -> None:
        """Take the adapter out, leaving the UNet exactly as ``install`` found it."""
        if self.projection is None:
            return
        if self._fused_weights is not None:
            self.unfuse_lora()
        self.unet.set_attn_processor(dict(self._original_processors))
        if self._peft is not None:
            self._peft.undo(self.unet)
        self.projection = None
        self.processors = {}
        self.branches = {}
        self._lora_layers = []
        self._peft = None

    @property
    def installed(self) -> bool:
        return self.projection is not None

    def detached_layers(self) -> list[str]:
        """Attention layers where the adapter no longer acts because other code took its place.

        Identity tokens reach the UNet as ``cross_attention_kwargs["ip_hidden_states"]``, which diffusers
        silently drops for any processor that does not take it: after ``set_default_attn_processor()``,
        ``enable_xformers_memory_efficient_attention()``, ``load_ip_adapter()`` and the like, a call would
        render a stranger. Likewise ``unload_lora_weights()`` takes the identity LoRA with it.
        """
        if self.projection is None:
            return []
        current = self.unet.attn_processors
        gone = [path for path, proc in self.processors.items() if current.get(f"{path}.processor") is not proc]
        for path in self._lora_layers:
            lora_a = getattr(self.unet.get_submodule(path), "lora_A", None)
            if lora_a is None or self.name not in lora_a:
                gone.append(path)
        return gone

    def check_attached(self) -> None:
        """Raise a FaceIDError when the adapter no longer acts on every layer it was installed on."""
        if self.projection is None:
            raise FaceIDError("the FaceID adapter was removed from this UNet; load the pipeline again to use it")
        gone = self.detached_layers()
        if not gone:
            return
        lora_gone = [path for path in gone if path not in self.processors]
        remedy = (
            "load the pipeline again (the identity LoRA was unloaded)"
            if lora_gone
            else "call pipe.adapter.reattach() to put the FaceID processors back, or load the pipeline again"
        )
        raise FaceIDError(
            f"the FaceID adapter no longer acts on {len(gone)} attention layer(s) (first: {gone[0]}): other code "
            "replaced its attention processors or unloaded its LoRA (set_default_attn_processor, xformers, "
            f"load_ip_adapter, unload_lora_weights...), so the identity would be ignored without a word; {remedy}"
        )

    def reattach(self) -> None:
        """Put the FaceID processors back on their layers after other code replaced them."""
        if self.projection is None:
            raise FaceIDError("the FaceID adapter was removed from this UNet; install it again")
        processors = dict(self.unet.attn_processors)
        processors.update({f"{path}.processor": proc for path, proc in self.processors.items()})
        self.unet.set_attn_processor(processors)

    # ------------------------------------------------------------------ knobs
    @property
    def scale(self) -> float:
        """The identity strength the user set: the default of every call (a call's ``scale=`` does not change it)."""
        return self._scale

    def set_scale(self, scale: float) -> None:
        """Identity strength: the weight of the identity branch in every cross-attention layer."""
        self._scale = float(scale)
        self._apply()

    @property
    def lora_scale(self) -> float:
        return self._lora_scale

    def set_lora_scale(self, lora_scale: float) -> None:
        """Weight of the identity LoRA (1.0 as released). Refused while fused: unfuse first."""
        self._refuse_if_fused(lora_scale)
        self._lora_scale = float(lora_scale)
        self._apply()

    @property
    def active(self) -> bool:
        """Whether the user has the adapter switched on (a call's identity window does not change it)."""
        return self._active

    def set_active(self, active: bool) -> None:
        """Switch the adapter's whole effect (identity branch and LoRA) off or back on; knobs are kept.

        Off, the UNet computes exactly what it computes without the adapter (both weights are 0, and a
        zero-weight branch is skipped or adds exact zeros).
        """
        if not active:
            self._refuse_off_if_fused()
        self._active = bool(active)
        self._apply()

    @property
    def has_lora(self) -> bool:
        return bool(self._lora_layers)

    def lora_weight(self, lora_scale: float | None = None, acting: bool = True) -> float:
        """The identity LoRA's weight in force for a call at ``lora_scale`` (None: the user's) when the adapter
        acts (switched on, inside the call's window), else 0."""
        return (self._lora_scale if lora_scale is None else float(lora_scale)) if acting and self._active else 0.0

    def put_lora_weight(self, weight: float) -> None:
        """Put ``weight`` on the identity LoRA's layers, leaving the user's settings as they are.

        For a call that holds the UNet's ``weights_guard`` (``faceid.weights``): it changes what every caller
        of the UNet computes, and the guard puts the user's settings back when the call is done.
        """
        if self._fused_weights is not None:
            if weight != self.lora_weight():
                raise FaceIDError(
                    "the identity LoRA is fused into the UNet: its weight is fixed at "
                    f"{self.lora_weight()} until unfuse_lora(), so a call cannot use {weight}"
                )
            return
        for path in self._lora_layers:
            set_layer_weight(self.unet.get_submodule(path), self.name, weight)

    def _apply(self) -> None:
        """Put the user's settings in force (0 when off) on the branches (for callers that pass a plain tensor)
        and on the LoRA, once no call runs on the UNet's weights."""
        with weights_guard(self.unet).exclusive():
            for branch in self.branches.values():
                branch.set_scale(self._scale)
                branch.set_gate(self._active)
            if self._fused_weights is None:
                for path in self._lora_layers:
                    set_layer_weight(self.unet.get_submodule(path), self.name, self.lora_weight())

    def _refuse_if_fused(self, lora_scale: float) -> None:
        if self._fused_weights is not None and float(lora_scale) != self._lora_scale:
            raise FaceIDError("the identity LoRA is fused into the UNet; call unfuse_lora() before changing lora_scale")

    def _refuse_off_if_fused(self) -> None:
        if self._fused_weights is not None:
            raise FaceIDError(
                "the identity LoRA is fused into the UNet and cannot be switched off; unfuse_lora() first"
            )

    # ------------------------------------------------------------------ LoRA fusing
    def fuse_lora(self) -> None:
        """Merge the identity LoRA into the base weights: no LoRA matmuls per step while ``lora_scale`` is fixed."""
        if not self._lora_layers or self._fused_weights is not None:
            return
        with weights_guard(self.unet).exclusive():
            self._fuse()

    def _fuse(self) -> None:
        saved = {}
        for path in self._lora_layers:
            layer = self.unet.get_submodule(path)
            others = [a for a in layer.active_adapters if a != self.name]
            if others and not set(others) <= set(layer.merged_adapters):
                raise FaceIDError(
                    f"cannot fuse the identity LoRA alone while other LoRAs ({', '.join(others)}) are active "
                    "and unfused on the same layers; fuse those first"
                )
            # Kept so that unfusing restores the weights bit for bit instead of subtracting in float.
            saved[path] = layer.get_base_layer().weight.detach().to("cpu", copy=True)
        for path in self._lora_layers:
            self.unet.get_submodule(path).merge(adapter_names=[self.name])
        self._fused_weights = saved

    def unfuse_lora(self) -> None:
        if self._fused_weights is None:
            return
        with weights_guard(self.unet).exclusive(), torch.no_grad():
            for path, weight in self._fused_weights.items():
                layer = self.unet.get_submodule(path)
                base = layer.get_base_layer().weight
                base.copy_(weight.to(base.device, base.dtype))
                layer.merged_adapters.remove(self.name)
        self._fused_weights = None

    @property
    def lora_fused(self) -> bool:
        return self._fused_weights is not None

    # ------------------------------------------------------------------ identity tokens
    @torch.no_grad()
    def identity_tokens(
        self,
        id_embeds: torch.Tensor,
        clip_embeds: torch.Tensor | None = None,
        uncond_clip_embeds: torch.Tensor | None = None,
        shortcut: bool = False,
        s_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional identity tokens (SPEC.md section 4).

        The unconditional tokens are the projection of an all-zero embedding (and, for Plus, of the CLIP
        features of an all-zero pixel tensor, ``uncond_clip_embeds``), not zeros.
        """
        if self.projection is None:
            raise RuntimeError("the adapter was removed")
        param = next(self.projection.parameters())
        id_embeds = id_embeds.to(param.device, param.dtype)
        if clip_embeds is not None:
            clip_embeds = clip_embeds.to(param.device, param.dtype)
            uncond_clip_embeds = uncond_clip_embeds.to(param.device, param.dtype)
        cond = self.projection(id_embeds, clip_embeds, shortcut=shortcut, s_scale=s_scale)
        uncond = self.projection(torch.zeros_like(id_embeds), uncond_clip_embeds, shortcut=shortcut, s_scale=s_scale)
        return cond, uncond

    # ------------------------------------------------------------------ export
    def state_dict(self) -> StateDict:
        """The adapter's weights in the official layout (``image_proj`` / ``ip_adapter`` by processor index)."""
        if self.projection is None:
            raise RuntimeError("the adapter was removed")
        ip: dict[str, torch.Tensor] = {}
        paths = [path for path, _ in _attention_layers(self.unet)]
        for index, path in enumerate(paths):
            for target in LORA_TARGETS:
                module_path = f"{path}.{_module_target(target)}"
                if module_path in self._lora_layers:
                    layer = self.unet.get_submodule(module_path)
                    ip[f"{index}.{target}_lora.down.weight"] = layer.lora_A[self.name].weight.detach()
                    ip[f"{index}.{target}_lora.up.weight"] = layer.lora_B[self.name].weight.detach()
            if path in self.branches:
                ip[f"{index}.to_k_ip.weight"] = self.branches[path].to_k_ip.weight.detach()
                ip[f"{index}.to_v_ip.weight"] = self.branches[path].to_v_ip.weight.detach()
        return {"image_proj": {k: v.detach() for k, v in self.projection.state_dict().items()}, "ip_adapter": ip}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{label} does not match the expected layout: {exc}") from None


def refuse_other_family(spec: AdapterSpec, cross_attention_dim: int, label: str, unet_desc: str | None = None) -> None:
    """Raise the error for a checkpoint whose cross-attention width is not the base model's."""
    if unet_desc is None:
        unet_desc = f"the base model is {family_name(cross_attention_dim)} (cross-attention dim {cross_attention_dim})"
    if cross_attention_dim in FAMILIES and spec.cross_attention_dim in FAMILIES:
        hint = (
            f"Use a FaceID checkpoint made for {family_name(cross_attention_dim)}, "
            f"or this one with a {spec.family} base model."
        )
    else:
        hint = "Use a FaceID checkpoint made for this base model."
    raise CheckpointError(f"{label} does not fit this base model: it is {spec.describe()}, while {unet_desc}. {hint}")


def check_fits(spec: AdapterSpec, unet: nn.Module, layers: list[tuple[str, nn.Module]], label: str) -> None:
    """Refuse a checkpoint that was made for another base model, saying what it is and what it fits."""
    unet_cad = unet.config.cross_attention_dim
    cross = [i for i, (_, attn) in enumerate(layers) if attn.is_cross_attention]
    unet_desc = f"the base model is {describe_unet(unet_cad, len(cross))}"

    def refuse(detail: str) -> None:
        raise CheckpointError(
            f"{label} does not fit this base model: it is {spec.describe()}, while {unet_desc}. {detail}".strip()
        )

    if spec.cross_attention_dim != unet_cad:
        refuse_other_family(spec, unet_cad, label, unet_desc)
    if sorted(spec.ip_layers) != cross:
        refuse("The checkpoint's layer numbering does not match this UNet's attention layers.")
    for index, (hidden, in_features) in spec.ip_layers.items():
        attn = layers[index][1]
        if (attn.to_k.out_features, attn.to_k.in_features) != (hidden, in_features):
            refuse(f"Layer {index} ({layers[index][0]}) has width {attn.to_k.out_features}, the checkpoint {hidden}.")
    for index, per_target in spec.lora_layers.items():
        if index >= len(layers):
            refuse(f"It has LoRA weights for attention layer {index}; this UNet has {len(layers)}.")
        attn = layers[index][1]
        for target, (in_features, out_features) in per_target.items():
            linear = get_base_layer(attn.get_submodule(_module_target(target)))
            if (linear.in_features, linear.out_features) != (in_features, out_features):
                refuse(
                    f"LoRA {index}.{target} is {in_features}->{out_features}, the layer "
                    f"{linear.in_features}->{linear.out_features}."
                )


def initial_state_dict(
    unet: nn.Module,
    num_tokens: int = 4,
    lora_rank: int | None = 128,
    id_dim: int = 512,
    hidden_dim: int = 1024,
    perceiver=None,
    generator: torch.Generator | None = None,
) -> StateDict:
    """A fresh adapter for ``unet`` in the official layout, initialised as the training recipe says.

    The projection gets PyTorch's default initialisation; every ``to_k_ip``/``to_v_ip`` starts as a copy
    of its layer's ``to_k``/``to_v`` (so the identity branch starts out attending like the text branch);
    LoRA ``down`` is Gaussian with std 1/rank and ``up`` is zero, so the LoRA starts as a no-op.
    """
    cad = unet.config.cross_attention_dim
    projection = IdentityProjection(cad, num_tokens, id_dim, hidden_dim, perceiver)
    ip: dict[str, torch.Tensor] = {}
    for index, (_, attn) in enumerate(_attention_layers(unet)):
        if lora_rank:
            for target in LORA_TARGETS:
                linear = get_base_layer(attn.get_submodule(_module_target(target)))
                down = torch.empty(lora_rank, linear.in_features).normal_(std=1 / lora_rank, generator=generator)
                ip[f"{index}.{target}_lora.down.weight"] = down
                ip[f"{index}.{target}_lora.up.weight"] = torch.zeros(linear.out_features, lora_rank)
        if attn.is_cross_attention:
            for target in ("to_k", "to_v"):
                linear = get_base_layer(attn.get_submodule(target))
                ip[f"{index}.{target}_ip.weight"] = linear.weight.detach().float().cpu().clone()
    return {"image_proj": {k: v.detach().clone() for k, v in projection.state_dict().items()}, "ip_adapter": ip}

"""Decoupled cross-attention: image-token branches added to every cross-attention layer of the UNet.

``attn2(x) = to_out( attention(q, K_text, V_text) + sum_g weight_g * mask_g * attention(q, K_g, V_g) )``
where ``K_g = to_k_ip(tokens_g)`` and ``V_g = to_v_ip(tokens_g)`` through the branch (adapter) of token
group ``g`` (SPEC.md section 3). One group is the FaceID case; several are several people (one identity
adapter, a region each) and style or composition references (standard IP-Adapters, a branch each).

Image tokens reach the processor explicitly, through ``cross_attention_kwargs["ip_hidden_states"]`` (a
key that diffusers' ``Attention`` lets through quietly), not by being appended to the text tokens and
sliced off again: the processor never has to guess how many of the context tokens are image tokens. LoRA
is not in here: it lives on ``to_q``/``to_k``/``to_v``/``to_out.0`` through PEFT, so this processor stays
the plain SDPA attention plus its branches.

Every weight is a tensor (a group's, set in place when its window opens or shuts; a branch's strength and
gate buffers), not a Python number, so that a compiled UNet (``torch.compile``) reads its value instead of
specialising on it: changing one between calls, or a window between steps, recompiles nothing. Everything
of a call (its groups, their weights, its key/value cache) comes with the call: calls from several threads
on one UNet share only the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # the type only; diffusers is a hard dependency anyway
    from diffusers.models.attention_processor import Attention
except ImportError:  # pragma: no cover
    Attention = nn.Module  # type: ignore[misc,assignment]

from .errors import FaceIDError


def _scaling_state(value: float | torch.Tensor) -> object:
    """A LoRA weight for the fingerprint: a number as is; a tensor (set in place, see
    ``peft_adapters.tensor_scalings``) by storage and in-place version, read without a device sync."""
    return (value.data_ptr(), value._version) if isinstance(value, torch.Tensor) else value


def module_state(*modules: nn.Module) -> tuple:
    """A fingerprint of everything a projection's output depends on besides its input.

    Covers the weights (storage and in-place version of every parameter, so a swapped or edited weight
    counts) and the state PEFT keeps on a LoRA-wrapped layer: which adapters are active, their weights
    (``scaling``), which are merged into the base weight, and whether adapters are disabled. Two equal
    fingerprints mean the projection computes the same function. Read duck-typed, so that this module
    needs nothing from PEFT.
    """
    parts: list = []
    for module in modules:
        for sub in module.modules():
            if hasattr(sub, "scaling") and hasattr(sub, "merged_adapters"):  # a PEFT LoRA layer
                parts.append(
                    (
                        tuple(sub.active_adapters),
                        tuple(sorted((name, _scaling_state(v)) for name, v in sub.scaling.items())),
                        tuple(sub.merged_adapters),
                        bool(sub.disable_adapters),
                    )
                )
        parts.extend((p.data_ptr(), p._version) for p in module.parameters())
    return tuple(parts)


class KeyValueCache:
    """Keys/values of context tensors that stay the same across the denoising steps of one call.

    Inside one pipeline call the text embeddings and the image tokens are the same tensor objects at every
    step, so their key/value projections need computing once per call, not once per step. But the
    projections themselves can change within a call: the identity window switches the identity LoRA on
    ``to_k``/``to_v`` on and off between steps, and a step callback may change a LoRA weight or fuse it.
    So an entry is reused only while both the source tensor (by identity and in-place version) and the
    fingerprint of the projecting modules (``module_state``) are unchanged; otherwise it is recomputed.

    A cache belongs to one call: the call makes it and passes it with its token groups (``CallTokens``), so
    calls from several threads never see each other's entries, and it is gone with the call. Nothing is
    cached inside a compiled UNet: the lookups are Python bookkeeping (tensor identities, fingerprints) that
    would break the graph at every layer, while the compiled projections are cheap.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor]] = {}

    def get(
        self, slot: tuple, source: torch.Tensor, modules: tuple[nn.Module, ...], compute
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = (source._version, module_state(*modules))
        entry = self._entries.get(slot)
        if entry is not None and entry[0] is source and entry[1] == state:
            return entry[2], entry[3]
        key, value = compute(source)
        # Holding a reference to ``source`` keeps its id from being reused by another tensor.
        self._entries[slot] = (source, state, key, value)
        return key, value


def _cached(cache: KeyValueCache | None, slot: tuple, source: torch.Tensor, modules: tuple, compute):
    if cache is None or torch.compiler.is_compiling():
        return compute(source)
    return cache.get(slot, source, modules, compute)


class TokenGroup:
    """One group of image tokens for the decoupled cross-attention of one call.

    A call can pass several: each identity's FaceID tokens, each reference image's IP-Adapter tokens. Each
    group is read through the projections of one ``branch`` (the adapter it belongs to), weighed by its
    ``scale`` (a number, or one per sample of the UNet batch: the whole weight of the group; the branch's own
    ``scale``/``gate`` buffers are for callers that pass a plain tensor), and optionally limited to a region:
    ``mask`` is ``(1 or batch, height, width)`` in [0, 1] in the output image's proportions, brought to each
    layer's resolution the way diffusers' ``IPAdapterMaskProcessor.downsample`` does. ``set_open`` shuts or
    reopens the group between steps (its step window) in place, without a device sync. ``null`` (optional)
    holds the group's tokens for "no identity", used by identity guidance.

    Groups are made per call and passed as ``cross_attention_kwargs["ip_hidden_states"]`` (a list, or a
    ``CallTokens`` with the call's key/value cache): nothing of them stays on the UNet.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        branch: str,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        mask: torch.Tensor | None = None,
        null: torch.Tensor | None = None,
    ) -> None:
        if tokens.ndim != 3:
            raise FaceIDError(f"a token group's tokens are (batch, tokens, dim), got shape {tuple(tokens.shape)}")
        if mask is not None and mask.ndim != 3:
            raise FaceIDError(f"a token group's mask is (1 or batch, height, width), got shape {tuple(mask.shape)}")
        self.tokens = tokens
        self.branch = branch
        self.mask = mask
        self.null = null
        given = torch.as_tensor(scale, dtype=torch.float32)
        if given.ndim > 1:
            raise FaceIDError(f"a group's scale is a number or one per sample (1-d), got shape {tuple(given.shape)}")
        # Whether every weight is 0, read once here (for values given on the host: no device sync), so that
        # opening and shutting the group between steps never asks the device.
        self._zero = not bool(given.any())
        self._scale = given.reshape(-1, 1, 1).to(tokens.device)
        self.weight = self._scale.clone()
        self._open = [True]  # shared with ``with_tokens`` copies, like ``weight``

    def set_open(self, open_: bool) -> None:
        """Open (the group's scale) or shut (0) the group, e.g. outside its step window; in place."""
        if bool(open_) != self._open[0]:
            self.weight.copy_(self._scale if open_ else torch.zeros_like(self._scale))
            self._open[0] = bool(open_)

    @property
    def idle(self) -> bool:
        """Whether the group adds nothing now (every weight 0, or shut); read on the host."""
        return self._zero or not self._open[0]

    def with_tokens(self, tokens: torch.Tensor) -> TokenGroup:
        """The same group over other tokens (e.g. a batch that identity guidance extends): it shares this
        group's weight and window state, so opening or shutting either acts on both."""
        if self.weight.shape[0] != 1:
            raise FaceIDError("a token group with a scale per sample cannot take another batch of tokens")
        group = TokenGroup(tokens, self.branch, 1.0, self.mask, None)
        group._scale, group.weight, group._zero, group._open = self._scale, self.weight, self._zero, self._open
        return group


class CallTokens:
    """What one call gives every decoupled cross-attention layer: its token groups and its key/value cache.

    Passed as ``cross_attention_kwargs["ip_hidden_states"]``, the same object at every step of the call, so
    that each layer computes the keys/values of the text and of every group once per call (``KeyValueCache``).
    """

    def __init__(self, groups: Sequence[TokenGroup], cache: KeyValueCache | None = None) -> None:
        self.groups = list(groups)
        self.cache = KeyValueCache() if cache is None else cache

    def with_groups(self, groups: Sequence[TokenGroup]) -> CallTokens:
        """Other groups (identity guidance's extended batch) with the same cache."""
        return CallTokens(groups, self.cache)


class CallAttention:
    """A call's identity whose attention is not an added branch (PuLID's projection onto the text attention):
    passed as ``cross_attention_kwargs["ip_hidden_states"]``, it computes each cross-attention layer itself with
    its method's processor for that layer (``attend``, handed the layer's ``FaceIDAttnProcessor`` to find it).
    Made per call like ``CallTokens``; the method's processors are loaded once and read-only."""

    def attend(
        self,
        processor: FaceIDAttnProcessor,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class DecoupledBranch(nn.Module):
    """One adapter's branch in a cross-attention layer: its ``to_k_ip``/``to_v_ip`` and its strength knobs.

    ``scale`` (the adapter's strength) and ``gate`` (whether the user has it switched on) are float32 buffers of
    shape ``(1, 1, 1)``, or ``(batch, 1, 1)`` for a strength per sample of the UNet batch, written in place by
    ``set_scale`` / ``set_gate``; they weigh the tokens of callers that pass a plain tensor (training, a bare
    UNet). A pipeline call brings its own weights in its token groups (its scale, its windows) and leaves these
    as the user set them. Where the weight is 0 the branch adds nothing, bit for bit.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        # Not persistent: the checkpoint layout has the projections only.
        self.register_buffer("scale", torch.ones(1, 1, 1), persistent=False)
        self.register_buffer("gate", torch.ones(1, 1, 1), persistent=False)
        # Host-side mirrors, read in eager mode only (a compiled UNet never reads them): when scale * gate is
        # 0 everywhere the branch is skipped rather than computed and discarded, with no device sync.
        self._zero_scale = False
        self._open = True
        self.set_scale(scale)

    @classmethod
    def for_layer(cls, attn: Attention, scale: float = 1.0) -> DecoupledBranch:
        """A branch sized for ``attn`` (its key projection's input and output widths)."""
        return cls(hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features, scale=scale)

    def set_scale(self, scale: float | Sequence[float] | torch.Tensor) -> None:
        """The branch's strength: a number, or one per sample of the UNet batch (in its order).

        Written into the ``scale`` buffer in place while its shape stays (a compiled UNet sees a new value,
        not a new graph); a change between one number and a per-sample strength, or of its length,
        replaces the buffer, and a compiled UNet then compiles once for the new shape.
        """
        if isinstance(scale, (int, float)):
            if self.scale.shape == (1, 1, 1):
                self.scale.fill_(float(scale))  # no host-device copy, no sync
            else:  # back from a per-sample scale
                self.scale = torch.full((1, 1, 1), float(scale), device=self.scale.device)
            zero = float(scale) == 0
        else:
            value = torch.as_tensor(scale, dtype=torch.float32)
            if value.ndim > 1:
                raise FaceIDError(
                    f"a per-sample identity scale is one number per sample (1-d), got shape {tuple(value.shape)}"
                )
            zero = not bool(value.any())  # before the move: no sync for values given on the host
            value = value.reshape(-1, 1, 1).to(self.scale.device)
            if value.shape == self.scale.shape:
                self.scale.copy_(value)
            else:
                self.scale = value
        self._zero_scale = zero

    def set_gate(self, open_: bool) -> None:
        """Open (1) or close (0) the branch, e.g. outside the adapter's window; in place."""
        self.gate.fill_(1.0 if open_ else 0.0)
        self._open = bool(open_)

    @property
    def idle(self) -> bool:
        """Whether the branch adds nothing now (the strength is 0 for every sample, or the gate shut)."""
        return self._zero_scale or not self._open

    def _apply(self, fn, recurse: bool = True):
        # ``scale`` and ``gate`` follow the module's device but stay float32 whatever its dtype, so that a
        # half-precision layer weighs its branch exactly by the number given.
        knobs = {name: self._buffers[name] for name in ("scale", "gate")}
        result = super()._apply(fn, recurse)
        for name, value in knobs.items():
            self._buffers[name] = value.to(self._buffers[name].device)
        return result


class FaceIDAttnProcessor(nn.Module):
    """Attention processor for a cross-attention layer with decoupled image-token branches.

    It owns one ``DecoupledBranch`` per adapter installed (``branches``, by adapter name: the FaceID
    adapter's first, then any reference IP-Adapter added next to it), sized from the ``Attention`` module it
    serves. The image tokens come with each call as ``ip_hidden_states``:

    * a ``CallTokens`` (what the pipeline passes): the call's token groups and its key/value cache;
    * a list of ``TokenGroup`` (several identities, reference images, each with its own branch, weight, region
      and window), computed afresh at every step;
    * a tensor: the first branch's tokens (the FaceID adapter), weighed by that branch's ``scale`` and ``gate``
      (training and direct UNet calls);
    * a ``CallAttention``: a call of another identity method whose attention is not an added branch (PuLID),
      which computes the layer's attention itself.

    Each group adds ``weight * attention(q, K, V)`` to the text attention, in list order. Where a group's
    weight is 0 it adds nothing, bit for bit; without ``ip_hidden_states`` the processor is exactly diffusers'
    ``AttnProcessor2_0``. The processor keeps no state of any call.
    """

    def __init__(self, name: str, branch: DecoupledBranch):
        super().__init__()
        self.branches = nn.ModuleDict({name: branch})
        self.primary = name

    @classmethod
    def for_layer(cls, attn: Attention, scale: float = 1.0, name: str = "faceid") -> FaceIDAttnProcessor:
        """A processor for ``attn`` with one branch, ``name``, sized for it."""
        return cls(name, DecoupledBranch.for_layer(attn, scale))

    @staticmethod
    def _text_modules(attn: Attention) -> tuple[nn.Module, ...]:
        """The modules the text keys/values go through (what their cache entry depends on)."""
        norm = (attn.norm_cross,) if attn.norm_cross else ()
        return (*norm, attn.to_k, attn.to_v)

    @staticmethod
    def _text_key_value(attn: Attention, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        return attn.to_k(context), attn.to_v(context)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | Sequence[TokenGroup] | CallTokens | CallAttention | None = None,
    ) -> torch.Tensor:
        if isinstance(ip_hidden_states, CallAttention):  # another method's attention in place of this one
            return ip_hidden_states.attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        cache = ip_hidden_states.cache if isinstance(ip_hidden_states, CallTokens) else None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            # Keyed on the tensor the UNet passes in (the same object at every step), before any norm.
            key, value = _cached(
                cache,
                (self, "text"),
                encoder_hidden_states,
                self._text_modules(attn),
                lambda ctx: self._text_key_value(attn, ctx),
            )

        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if isinstance(ip_hidden_states, torch.Tensor):  # one group: the FaceID adapter's tokens, its own knobs
            branch = self.branches[self.primary]
            # Compiled, the branch is always computed: skipping it would be Python control flow on a tensor value.
            if torch.compiler.is_compiling() or not branch.idle:
                hidden_states = self._add_group(
                    hidden_states, query, heads, None, "identity", branch, ip_hidden_states, branch.scale * branch.gate
                )
        elif ip_hidden_states is not None:
            groups = ip_hidden_states.groups if isinstance(ip_hidden_states, CallTokens) else ip_hidden_states
            for index, group in enumerate(groups):
                if group.branch not in self.branches:
                    raise FaceIDError(
                        f"token group {index} is for adapter {group.branch!r}, which is not loaded on this UNet "
                        f"(loaded: {', '.join(self.branches)})"
                    )
                if not torch.compiler.is_compiling() and group.idle:
                    continue
                hidden_states = self._add_group(
                    hidden_states,
                    query,
                    heads,
                    cache,
                    f"group{index}",
                    self.branches[group.branch],
                    group.tokens,
                    group.weight,
                    group.mask,
                )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _add_group(
        self,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        heads,
        cache: KeyValueCache | None,
        slot: str,
        branch: DecoupledBranch,
        tokens: torch.Tensor,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states`` plus one group's attention over its tokens (through ``branch``) times ``weight``,
        a float32 ``(1 or batch, 1, 1)`` tensor."""
        batch_size = hidden_states.shape[0]
        if tokens.shape[0] != batch_size:
            raise ValueError(f"identity tokens have batch {tokens.shape[0]} but the UNet batch is {batch_size}")
        if weight.shape[0] not in (1, batch_size):
            raise FaceIDError(
                f"the identity scale has {weight.shape[0]} values but the UNet batch is {batch_size}: "
                "give one number, or one per sample"
            )
        ip_key, ip_value = _cached(
            cache,
            (self, slot),
            tokens,
            (branch.to_k_ip, branch.to_v_ip),
            lambda ctx: (branch.to_k_ip(ctx), branch.to_v_ip(ctx)),
        )
        ip_states = F.scaled_dot_product_attention(
            query, heads(ip_key), heads(ip_value), attn_mask=None, dropout_p=0.0, is_causal=False
        )
        ip_states = ip_states.transpose(1, 2).reshape(batch_size, ip_states.shape[2], -1).to(query.dtype)
        if mask is not None:
            queries = ip_states.shape[1]
            region, _ = _cached(
                cache,
                (self, f"{slot}.mask{queries}"),
                mask,
                (),
                lambda m: (_downsample_mask(m, batch_size, queries),) * 2,
            )
            ip_states = ip_states * region.to(ip_states.dtype)
        # float32 weight times the branch, rounded once to the layer's dtype (as a Python number would be).
        added = hidden_states + (ip_states * weight).to(hidden_states.dtype)
        # Where the weight is 0, exactly the output without adapter (even were the branch inf or nan).
        return torch.where(weight == 0, hidden_states, added)


def _downsample_mask(mask: torch.Tensor, batch_size: int, queries: int) -> torch.Tensor:
    """A region mask ``(1 or batch, H, W)`` at a layer's resolution, ``(batch, queries, 1)``.

    diffusers' ``IPAdapterMaskProcessor.downsample``: the layer's height and width are not known inside a
    transformer block (its tokens come flattened), so they are inferred from the token count and the mask's
    proportions, exactly as diffusers infers them, so that a region means the same in both.
    """
    from diffusers.image_processor import IPAdapterMaskProcessor

    if mask.shape[0] not in (1, batch_size):
        raise FaceIDError(f"a region mask has {mask.shape[0]} rows but the UNet batch is {batch_size}")
    return IPAdapterMaskProcessor.downsample(mask.float(), batch_size, queries, 1)

"""Identity guidance: a guidance term for the identity, apart from the text's.

Classifier-free guidance pushes the prediction from the unconditional one towards the prompt's. Identity
guidance adds a push from "the same prompt without the identity" towards "the prompt with it"::

    eps = eps(neg, null id) + g * (eps(text, id) - eps(neg, null id)) + w * (eps(text, id) - eps(text, null id))

where ``null id`` is the adapter's unconditional identity tokens (the projection of a zero embedding: what
the adapter was trained to read as "no identity" through embedding dropout). Few-step modes run without
text guidance (``g`` off), and lose likeness for it (FastFace); ``w`` gives it back at one extra batch
entry per image. ``w = 0`` adds nothing: no hook, no extra UNet work, bit for bit the plain call.

It is done around diffusers' own denoising loop rather than in a copy of it: for the call, a pre-hook on
the UNet appends the conditional entries again with the null identity tokens (one UNet batch, so no
extra pass), and a hook on its output folds them back into the conditional half so that diffusers'
``uncond + g * (cond - uncond)`` gives the formula above (without text guidance diffusers uses the
conditional prediction as it is).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def identity_guidance(
    unet: nn.Module,
    weight: float,
    guidance_scale: float,
    classifier_free_guidance: bool,
    null_identity: torch.Tensor,
) -> Iterator[None]:
    """Inside the block, every UNet call of the pipeline is identity-guided with ``weight``.

    ``null_identity``: the unconditional identity tokens of the conditional entries, in their batch order
    (one row per image). ``classifier_free_guidance``: whether the pipeline's batch has an unconditional
    first half (then ``guidance_scale`` is the text guidance it applies).
    """
    if weight == 0:
        yield
        return
    memo: dict[int, tuple[Any, Any]] = {}  # per call: the same source -> the same extension
    sizes: dict[str, int] = {}

    def extended(source: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        # The UNet gets the same text/identity tensors at every step; giving it the same extended tensors
        # keeps the attention processors' key/value cache working across steps.
        hit = memo.get(id(source))
        if hit is not None and hit[0] is source:
            return hit[1]
        n, b = sizes["n"], sizes["b"]
        tail = extra if extra is not None else source[n - b :]
        result = torch.cat([source, tail.to(device=source.device, dtype=source.dtype)])
        memo[id(source)] = (source, result)
        return result

    def extended_groups(groups: list) -> list:
        hit = memo.get(id(groups))
        if hit is not None and hit[0] is groups:
            return hit[1]
        result = [group.with_tokens(extended(group.tokens, group.null)) for group in groups]
        memo[id(groups)] = (groups, result)
        return result

    def batched(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == sizes["n"]:
            return extended(value)
        if isinstance(value, dict):
            return {key: batched(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):  # a ControlNet's down-block residuals: new at every step, no memo
            n, b = sizes["n"], sizes["b"]
            return type(value)(
                torch.cat([item, item[n - b :]]) if isinstance(item, torch.Tensor) and item.shape[:1] == (n,) else item
                for item in value
            )
        return value

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        sample = args[0] if args else kwargs["sample"]
        n = sample.shape[0]
        sizes["n"], sizes["b"] = n, (n // 2 if classifier_free_guidance else n)
        if sizes["b"] != null_identity.shape[0]:
            raise ValueError(f"identity guidance: {null_identity.shape[0]} images but a UNet batch of {n}")
        args = [batched(a) for a in args]
        attention = dict(kwargs.get("cross_attention_kwargs") or {})
        identity = attention.pop("ip_hidden_states", None)
        kwargs = {key: batched(value) for key, value in kwargs.items() if key != "cross_attention_kwargs"}
        if isinstance(identity, torch.Tensor):
            attention["ip_hidden_states"] = extended(identity, null_identity)
        elif identity is not None:  # token groups: each identity with its own null tokens, references as they are
            attention["ip_hidden_states"] = extended_groups(identity)
        kwargs["cross_attention_kwargs"] = attention
        return tuple(args), kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        n, b = sizes["n"], sizes["b"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        main, without = prediction[:n], prediction[n:]
        cond = main[n - b :]
        # diffusers then applies uncond + g * (cond' - uncond): divide by g so that w is not scaled by it.
        push = weight / guidance_scale if classifier_free_guidance else weight
        guided = torch.cat([main[: n - b], cond + push * (cond - without)])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

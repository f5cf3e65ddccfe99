"""Identity guidance: a guidance term for the identity, apart from the text's.

Classifier-free guidance pushes the prediction from the unconditional one towards the prompt's. Identity
guidance adds a push from "the same prompt without the identity" towards "the prompt with it"::

    eps = eps(neg, null id) + g * (eps(text, id) - eps(neg, null id)) + w * (eps(text, id) - eps(text, null id))

where ``null id`` is the adapter's unconditional identity tokens (the projection of a zero embedding: what
the adapter was trained to read as "no identity" through embedding dropout). Few-step modes run without
text guidance (``g`` off), and lose likeness for it (FastFace); ``w`` gives it back at one extra batch
entry per image. ``w = 0`` adds nothing: no hook, no extra UNet work, bit for bit the plain call.

It is done around diffusers' own denoising loop rather than in a copy of it: the call's diffusers pipeline
object runs an ``IdentityGuidedUNet`` (its own view of the shared UNet) that appends the conditional entries
again with the null identity tokens (one UNet batch, so no extra pass) and folds their prediction back into
the conditional half, so that diffusers' ``uncond + g * (cond - uncond)`` gives the formula above (without
text guidance diffusers uses the conditional prediction as it is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import CallTokens


class IdentityGuidedUNet:
    """One call's view of the UNet that identity-guides its predictions with ``weight`` (see the module).

    The call's diffusers pipeline object gets this in place of its UNet, so the guidance belongs to the call:
    nothing is hooked onto the shared UNet, and other calls on it are untouched. Every attribute but the call
    itself is the UNet's (config, dtype, device...).

    ``null_identity``: the unconditional identity tokens of the conditional entries, in their batch order
    (one row per image). ``classifier_free_guidance``: whether the pipeline's batch has an unconditional
    first half (then ``guidance_scale`` is the text guidance it applies).
    """

    def __init__(
        self,
        unet: nn.Module,
        weight: float,
        guidance_scale: float,
        classifier_free_guidance: bool,
        null_identity: torch.Tensor,
        attention_kwargs: str = "cross_attention_kwargs",
    ) -> None:
        self.unet = unet
        self.attention_kwargs = attention_kwargs  # the keyword under which the image tokens travel
        self.weight = weight
        self.guidance_scale = guidance_scale
        self.classifier_free_guidance = classifier_free_guidance
        self.null_identity = null_identity
        # One extension per argument (its name): the UNet gets the same text and identity tensors at every step,
        # and the same extended ones keep the attention's key/value cache hitting. A new source replaces the
        # entry, so what a step alone used (its latents, a ControlNet's residuals) is not kept past it.
        self._extended: dict[str, tuple[Any, int, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, sample = list(args), kwargs.pop("sample", None)
        if sample is None:
            sample = args.pop(0)
        n = sample.shape[0]
        b = n // 2 if self.classifier_free_guidance else n
        if b != self.null_identity.shape[0]:
            raise ValueError(f"identity guidance: {self.null_identity.shape[0]} images but a UNet batch of {n}")
        args = [self._batched(f"arg{k}", a, n, b) for k, a in enumerate(args)]
        attention = dict(kwargs.pop(self.attention_kwargs, None) or {})
        kwargs = {key: self._batched(key, value, n, b) for key, value in kwargs.items()}
        identity = attention.pop("ip_hidden_states", None)
        if identity is not None:
            attention["ip_hidden_states"] = self._extended_identity(identity, n, b)
        kwargs[self.attention_kwargs] = attention
        # The latents are new at every step: extended without being kept.
        output = self.unet(torch.cat([sample, sample[n - b :]]), *args, **kwargs)
        return self._fold(output, n, b)

    def _memo(self, slot: str, source: Any, make) -> Any:
        version = getattr(source, "_version", 0)
        hit = self._extended.get(slot)
        if hit is not None and hit[0] is source and hit[1] == version:
            return hit[2]
        result = make()
        self._extended[slot] = (source, version, result)
        return result

    def _extend(self, slot: str, source: torch.Tensor, n: int, b: int, extra: torch.Tensor | None = None):
        tail = source[n - b :] if extra is None else extra.to(device=source.device, dtype=source.dtype)
        return self._memo(slot, source, lambda: torch.cat([source, tail]))

    def _batched(self, slot: str, value: Any, n: int, b: int) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            return self._extend(slot, value, n, b)
        if isinstance(value, dict):
            return {key: self._batched(f"{slot}.{key}", item, n, b) for key, item in value.items()}
        if isinstance(value, (list, tuple)):  # a ControlNet's down-block residuals: new at every step
            return type(value)(
                torch.cat([item, item[n - b :]]) if isinstance(item, torch.Tensor) and item.shape[:1] == (n,) else item
                for item in value
            )
        return value

    def _extended_identity(self, identity: Any, n: int, b: int) -> Any:
        if isinstance(identity, torch.Tensor):
            return self._extend("ip", identity, n, b, self.null_identity)

        def groups() -> Any:  # each identity with its own null tokens, references as they are
            source = identity.groups if isinstance(identity, CallTokens) else identity
            extended = [g.with_tokens(self._extend(f"ip{k}", g.tokens, n, b, g.null)) for k, g in enumerate(source)]
            return identity.with_groups(extended) if isinstance(identity, CallTokens) else extended

        return self._memo("ip", identity, groups)

    def _fold(self, output: Any, n: int, b: int) -> Any:
        prediction = output[0] if isinstance(output, tuple) else output.sample
        main, without = prediction[:n], prediction[n:]
        cond = main[n - b :]
        # diffusers then applies uncond + g * (cond' - uncond): divide by g so that w is not scaled by it.
        push = self.weight / self.guidance_scale if self.classifier_free_guidance else self.weight
        guided = torch.cat([main[: n - b], cond + push * (cond - without)])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

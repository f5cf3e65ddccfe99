"""Identity projection: face embedding (+ CLIP features of the face) -> identity tokens.

One module serves every released variant (SPEC.md section 2):

* FaceID / FaceID-SDXL / Portrait: an MLP turns the 512-d embedding into ``num_tokens`` tokens of the
  UNet's cross-attention width, followed by a LayerNorm.
* Plus / PlusV2: the same MLP tokens become the queries of a perceiver resampler over CLIP ViT
  penultimate hidden states. PlusV2 adds the "shortcut" ``tokens + s_scale * perceiver(...)``.

Submodule names follow the reference implementation (``proj.0``, ``proj.2``, ``norm``,
``perceiver_resampler.*``) so the official ``image_proj`` state dicts load strictly, without renaming.
``shortcut`` and ``s_scale`` are forward arguments, never attributes to set between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerceiverConfig:
    """Shape of the Plus perceiver; every number is read off a checkpoint by ``AdapterSpec``."""

    clip_dim: int  # width of the CLIP image features (1280 for ViT-H/14)
    depth: int = 4
    dim_head: int = 64
    ff_mult: int = 4


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latents attend to [image features ; latents] (the reference's ``PerceiverAttention``).

    ``kv_dim`` (the features' width, if not ``dim``) and ``attend_to_latents=False`` (keys and values from the
    features alone) make it PuLID-FLUX's ``PerceiverAttentionCA``, where the DiT's image tokens (the latents)
    read the identity tokens (the features): the same maths otherwise, so one class serves both.
    """

    def __init__(self, dim: int, dim_head: int, heads: int, kv_dim: int | None = None, attend_to_latents: bool = True):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        if attend_to_latents and kv_dim != dim:
            raise ValueError("the latents can join the keys only when the features have their width (kv_dim = dim)")
        self.dim_head = dim_head
        self.heads = heads
        self.attend_to_latents = attend_to_latents
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(kv_dim)  # on the image features
        self.norm2 = nn.LayerNorm(dim)  # on the latents (queries)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, length, _ = latents.shape
        q = _split_heads(self.to_q(latents), self.heads)
        context = torch.cat((features, latents), dim=-2) if self.attend_to_latents else features
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)
        # Scaling q and k by dim_head ** -0.25 each (rather than the product afterwards) and taking the
        # softmax in float32 is what the released weights were trained with; it is also fp16-safe.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, length, -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """The perceivers' feed-forward block (LayerNorm, Linear, GELU, Linear; keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverResampler(nn.Module):
    """The FaceID-Plus resampler: the identity tokens are the perceiver's queries (``output_dim`` = ``dim``)."""

    def __init__(self, dim: int, config: PerceiverConfig, output_dim: int | None = None):
        super().__init__()
        output_dim = output_dim or dim
        self.proj_in = nn.Linear(config.clip_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        heads = dim // config.dim_head
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, config.dim_head, heads), feed_forward(dim, config.ff_mult)])
            for _ in range(config.depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IdentityProjection(nn.Module):
    """Face embedding(s) -> identity tokens of shape (batch, faces * num_tokens, cross_attention_dim).

    ``id_embeds`` is (batch, id_dim) for one face per sample, or (batch, faces, id_dim) for several faces
    of one person per sample (Portrait): each face gives ``num_tokens`` tokens and they are concatenated.
    ``clip_embeds`` (Plus only) is (batch, [faces,] clip_tokens, clip_dim), paired with ``id_embeds``.
    """

    def __init__(
        self,
        cross_attention_dim: int,
        num_tokens: int,
        id_dim: int = 512,
        hidden_dim: int = 1024,
        perceiver: PerceiverConfig | None = None,
    ):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Sequential(
            nn.Linear(id_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cross_attention_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = PerceiverResampler(cross_attention_dim, perceiver) if perceiver else None

    @property
    def needs_clip(self) -> bool:
        return self.perceiver_resampler is not None

    def forward(
        self,
        id_embeds: torch.Tensor,
        clip_embeds: torch.Tensor | None = None,
        shortcut: bool = False,
        s_scale: float = 1.0,
    ) -> torch.Tensor:
        if id_embeds.ndim not in (2, 3):
            raise ValueError(f"id_embeds must be (batch, dim) or (batch, faces, dim), got {tuple(id_embeds.shape)}")
        batch = id_embeds.shape[0]
        flat = id_embeds.reshape(-1, id_embeds.shape[-1])
        tokens = self.norm(self.proj(flat).reshape(-1, self.num_tokens, self.cross_attention_dim))
        if self.perceiver_resampler is not None:
            if clip_embeds is None:
                raise ValueError("this adapter (FaceID-Plus) needs CLIP image features of the face (clip_embeds)")
            clip_flat = clip_embeds.reshape(-1, *clip_embeds.shape[-2:])
            out = self.perceiver_resampler(tokens, clip_flat)
            tokens = tokens + s_scale * out if shortcut else out
        return tokens.reshape(batch, -1, self.cross_attention_dim)


class ImageResampler(PerceiverResampler):
    """IP-Adapter-Plus's projection (``Resampler``): learned queries read CLIP's penultimate hidden states.

    The same perceiver as FaceID-Plus with learned ``latents`` as its queries, a width ``dim`` of its own
    and an output of the UNet's cross-attention width; keys as released (``latents``, ``proj_in``...).
    """

    def __init__(self, dim: int, config: PerceiverConfig, num_tokens: int, output_dim: int):
        super().__init__(dim, config, output_dim)
        self.num_tokens = num_tokens
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / dim**0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(self.latents.expand(features.shape[0], -1, -1), features)


class ImageProjection(nn.Module):
    """Plain IP-Adapter's projection (``ImageProjModel``): a CLIP image embedding -> ``num_tokens`` tokens."""

    def __init__(self, cross_attention_dim: int, num_tokens: int, clip_dim: int):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_dim, cross_attention_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))

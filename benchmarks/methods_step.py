#!/usr/bin/env python
"""Per-step denoiser cost of the identity methods next to their plain base model, on the same shapes, in one run.

SDXL rows (with classifier-free guidance: a UNet batch of 2, ``[uncond, cond]``):

* ``sdxl``            the diffusers SDXL ``UNet2DConditionModel``, no method;
* ``sdxl+faceid``     faceid's IP-Adapter-FaceID path on its own copy of the UNet: ``FaceIDAdapter.install``
                      (rank-128 PEFT LoRA, unfused) and one call's tokens with its key/value cache
                      (``CallTokens``), as ``benchmarks/bench_step.py`` times it for SD1.5;
* ``sdxl+instantid``  ``faceid.methods.instantid``: ``InstantID.step`` (IdentityNet, a full SDXL ControlNet
                      reading the 16 identity tokens, then the UNet with the ``instantid`` decoupled branch);
* ``sdxl+pulid``      ``faceid.methods.pulid.PuLIDSDXL`` (v1.1): its processors on the cross-attention layers, a
                      call's ``PuLIDTokens`` (32 identity tokens + 20 zero tokens, ortho v2, the app's default).

FLUX rows (FLUX.1-dev is guidance-distilled: a transformer batch of 1):

* ``flux``            the diffusers ``FluxTransformer2DModel``, no method;
* ``flux+pulid``      ``PuLIDFlux.attach`` (v0.9.1): a cross-attention module after every 2nd double and every
                      4th single block, reading a call's ``PuLIDIdentity``;
* ``flux+infiniteyou`` ``faceid.methods.infiniteyou.denoise_step``: InfuseNet (a ``FluxControlNetModel`` reading
                      the 8 identity tokens) then the transformer with its residuals.

Every weight is random and everything is built in memory (nothing is downloaded). ``--scale full`` is the released
architectures (SDXL UNet config, FLUX.1-dev's 19 double / 38 single blocks, the methods' released module sizes) at
1024x1024: a GPU size. ``small`` (the CPU default) keeps every block and layer of ``full`` and the methods'
identity token counts (so the methods act on as many layers, with as many tokens, as released) and makes the
widths narrower (head widths kept) and the image smaller (512 px); ``tiny`` is a smoke-test size; the script
prints every size it builds. The identity tokens are computed once per call (the methods' encoders, timed apart:
"tokens ms"); the table is the per-step cost.

For each row: ``--warmup`` untimed steps, then ``--repeats`` rounds of ``--steps`` timed steps, the rows of a
family taking turns in each round (rotating order), so load from other processes hits every row alike. The
figure is the median ms per step; "x base" is its ratio to the plain base model's median of the same run.

Usage::

    python benchmarks/methods_step.py                              # CPU: --scale small, fp32 (about 1-2 minutes)
    python benchmarks/methods_step.py --scale tiny --steps 1 --repeats 1 --warmup 0   # smoke run, seconds
    python benchmarks/methods_step.py --scale full --device cuda --dtype bf16 --json out.json   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import make_checkpoint  # noqa: E402  (the IP-Adapter-FaceID checkpoint in the official layout)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FAMILIES = ("sdxl", "flux")


# ---------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SDXLSizes:
    """The SDXL UNet and the SDXL methods' modules. ``full`` is the released sizes."""

    block_out_channels: tuple[int, ...]
    heads: tuple[int, ...]  # diffusers' "attention_head_dim" of SDXL, which is the number of heads
    transformer_layers_per_block: tuple[int, ...]
    cross_attention_dim: int  # text context width (CLIP-L 768 + OpenCLIP-bigG 1280)
    pooled_dim: int  # OpenCLIP-bigG pooled text embedding
    time_ids_dim: int  # addition_time_embed_dim (6 time ids)
    resolution: int  # pixels; latents are 1/8
    text_tokens: int
    faceid_lora_rank: int
    resampler_dim: int  # InstantID's Resampler (IP-Adapter-Plus's), 16 tokens, depth 4, head width 64
    resampler_depth: int
    identity_tokens: int
    idformer_dim: int  # PuLID's ID encoder, head width 64, 32 queries + 5 id tokens, 5 EVA scales
    idformer_depth: int
    eva_width: int  # the EVA02-CLIP-L features the ID encoder reads (computed outside: random here)
    eva_tokens: int
    pulid_num_zero: int = 20
    pulid_ortho: str = "v2"

    def unet_config(self) -> dict:
        return dict(
            sample_size=self.resolution // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=self.block_out_channels,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(self.block_out_channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(self.block_out_channels) - 1) + ("UpBlock2D",),
            attention_head_dim=self.heads,
            transformer_layers_per_block=self.transformer_layers_per_block,
            cross_attention_dim=self.cross_attention_dim,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=self.time_ids_dim,
            projection_class_embeddings_input_dim=self.pooled_dim + 6 * self.time_ids_dim,
            norm_num_groups=32,
            norm_eps=1e-5,
            act_fn="silu",
            flip_sin_to_cos=True,
            freq_shift=0,
        )


@dataclass(frozen=True)
class FluxSizes:
    """The FLUX.1 transformer and the FLUX methods' modules. ``full`` is FLUX.1-dev and the released sizes."""

    double_blocks: int
    single_blocks: int
    heads: int  # head width 128
    text_dim: int  # T5-XXL width
    pooled_dim: int  # CLIP-L pooled
    resolution: int  # pixels; 1/8 latents packed 2x2: (resolution / 16)^2 image tokens
    text_tokens: int
    infusenet_double: int
    infusenet_single: int
    resampler_dim: int  # InfiniteYou's Resampler: 8 tokens of text_dim, depth 4, head width 64
    identity_tokens: int
    ca_heads: int  # PuLID-FLUX PerceiverAttentionCA: dim = transformer width, kv = the ID encoder's output
    idformer_dim: int
    idformer_output: int
    idformer_depth: int
    eva_width: int
    eva_tokens: int
    head_dim: int = 128
    rope_axes: tuple[int, int, int] = (16, 56, 56)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def transformer_config(self) -> dict:
        return dict(
            patch_size=1,
            in_channels=64,
            num_layers=self.double_blocks,
            num_single_layers=self.single_blocks,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.heads,
            joint_attention_dim=self.text_dim,
            pooled_projection_dim=self.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=self.rope_axes,
        )


@dataclass(frozen=True)
class Scale:
    name: str
    sdxl: SDXLSizes
    flux: FluxSizes
    note: str


SCALES = {
    "full": Scale(
        "full",
        SDXLSizes(
            block_out_channels=(320, 640, 1280),
            heads=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            pooled_dim=1280,
            time_ids_dim=256,
            resolution=1024,
            text_tokens=77,
            faceid_lora_rank=128,
            resampler_dim=1280,
            resampler_depth=4,
            identity_tokens=16,
            idformer_dim=1024,
            idformer_depth=10,
            eva_width=1024,
            eva_tokens=577,
        ),
        FluxSizes(
            double_blocks=19,
            single_blocks=38,
            heads=24,
            text_dim=4096,
            pooled_dim=768,
            resolution=1024,
            text_tokens=512,
            infusenet_double=4,
            infusenet_single=10,
            resampler_dim=1280,
            identity_tokens=8,
            ca_heads=16,
            idformer_dim=1024,
            idformer_output=2048,
            idformer_depth=10,
            eva_width=1024,
            eva_tokens=577,
        ),
        "the released architectures at 1024x1024",
    ),
    "small": Scale(
        "small",
        SDXLSizes(
            block_out_channels=(64, 128, 256),  # 1/5, heads 1/2/4 of width 64
            heads=(1, 2, 4),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=384,
            pooled_dim=256,
            time_ids_dim=64,
            resolution=512,
            text_tokens=77,
            faceid_lora_rank=32,
            resampler_dim=256,
            resampler_depth=4,
            identity_tokens=16,
            idformer_dim=256,
            idformer_depth=10,
            eva_width=256,
            eva_tokens=577,
        ),
        FluxSizes(
            double_blocks=19,
            single_blocks=38,
            heads=1,  # width 128 (1/24), one head of the released width 128
            text_dim=192,
            pooled_dim=32,
            resolution=512,
            text_tokens=128,  # image : text tokens 8 : 1, as 4096 : 512
            infusenet_double=4,
            infusenet_single=10,
            resampler_dim=64,
            identity_tokens=8,
            ca_heads=1,
            idformer_dim=64,
            idformer_output=96,
            idformer_depth=10,
            eva_width=64,
            eva_tokens=577,
        ),
        "every block and layer of full; SDXL widths 1/5, FLUX width 128 (1/24); 512 px",
    ),
    "tiny": Scale(
        "tiny",
        SDXLSizes(
            block_out_channels=(32, 64, 64),
            heads=(1, 1, 1),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,
            pooled_dim=32,
            time_ids_dim=8,
            resolution=128,
            text_tokens=8,
            faceid_lora_rank=8,
            resampler_dim=64,
            resampler_depth=1,
            identity_tokens=4,
            idformer_dim=64,
            idformer_depth=5,
            eva_width=32,
            eva_tokens=17,
        ),
        FluxSizes(
            double_blocks=2,
            single_blocks=4,
            heads=1,
            head_dim=32,
            rope_axes=(8, 12, 12),
            text_dim=64,
            pooled_dim=16,
            resolution=128,
            text_tokens=8,
            infusenet_double=1,
            infusenet_single=1,
            resampler_dim=64,
            identity_tokens=4,
            ca_heads=1,
            idformer_dim=64,
            idformer_output=64,
            idformer_depth=5,
            eva_width=32,
            eva_tokens=17,
        ),
        "a smoke-test size: fewer layers and blocks, narrow, 128 px",
    ),
}


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def building(device: str, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Modules made inside are created on ``device`` in ``dtype`` (no fp32 copy on the host: FLUX.1 is 12B)."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def frozen(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unzero(*modules: torch.nn.Module, std: float = 0.02) -> None:
    """ControlNets start with zeroed output layers; trained ones are not, so give them small random weights (the
    time of a step does not depend on it, but the residuals then change the output, as trained ones do)."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.normal_(0.0, std)


def parameters(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_note() -> str:
    try:
        return f"load avg {os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def median_ms(fn: Callable[[], object], device: str, runs: int = 2) -> float:
    """Median wall ms of ``fn`` after one untimed run (the per-call identity tokens)."""
    fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class Row:
    """One measured configuration: ``enter``/``leave`` put the method on the shared model and take it off around
    its turn (outside the timing); ``step`` is one denoiser step."""

    name: str
    label: str
    step: Callable[[], torch.Tensor]
    extra_parameters: int = 0  # the method's modules that a step runs, beyond the base model's
    tokens_ms: float | None = None  # the identity tokens, once per call
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    times_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time (all threads) of each timed step
    output: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- SDXL
def sdxl_rows(sizes: SDXLSizes, device: str, dtype: torch.dtype, seed: int, notes: dict) -> list[Row]:
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from faceid.adapter import FaceIDAdapter
    from faceid.attention import CallTokens, TokenGroup
    from faceid.methods.instantid import InstantID
    from faceid.methods.pulid import IDFormerConfig, PuLIDFace, PuLIDSDXL, PuLIDTokens, cross_attention_names
    from faceid.projection import ImageResampler, PerceiverConfig

    with building(device, dtype, seed):
        unet = UNet2DConditionModel(**sizes.unet_config())
    unet.set_attn_processor(AttnProcessor2_0())
    unet = frozen(unet, device, dtype)
    plain_processors = dict(unet.attn_processors)
    cross = cross_attention_names(unet)
    notes["sdxl_unet_parameters"] = parameters(unet)
    notes["sdxl_attention_layers"] = {"self": len(plain_processors) - len(cross), "cross": len(cross)}

    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    latent = sizes.resolution // 8
    batch = 2  # classifier-free guidance of one image: [uncond, cond]
    sample = randn(batch, 4, latent, latent)
    timestep = torch.tensor(500, device=device)
    text = randn(batch, sizes.text_tokens, sizes.cross_attention_dim)
    added = {
        "text_embeds": randn(batch, sizes.pooled_dim),
        "time_ids": torch.tensor([[sizes.resolution] * 2 + [0, 0] + [sizes.resolution] * 2] * batch).to(device, dtype),
    }
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1)

    def unet_step(model, **kwargs) -> torch.Tensor:
        return model(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added, **kwargs).sample

    rows = [Row("sdxl", "SDXL UNet, no method", lambda: unet_step(unet))]

    # faceid's FaceID adapter: its LoRA changes the UNet's layers, so it gets a copy of its own.
    faceid_unet = copy.deepcopy(unet)
    checkpoint = make_checkpoint(faceid_unet, sizes.faceid_lora_rank, seed)
    adapter = FaceIDAdapter.install(faceid_unet, checkpoint, scale=1.0, lora_scale=1.0)
    cond, uncond = adapter.identity_tokens(face.to(device, dtype))
    faceid_tokens = CallTokens([TokenGroup(torch.cat([uncond, cond]), adapter.name, 1.0)])
    lora = parameters(faceid_unet) - parameters(unet)
    rows.append(
        Row(
            "sdxl+faceid",
            f"+ FaceID (LoRA rank {sizes.faceid_lora_rank} unfused, call's K/V cache)",
            lambda: unet_step(faceid_unet, cross_attention_kwargs={"ip_hidden_states": faceid_tokens}),
            extra_parameters=lora + parameters(adapter.projection),
            tokens_ms=median_ms(lambda: adapter.identity_tokens(face.to(device, dtype)), device),
        )
    )

    # InstantID: its ip-adapter.bin (the Resampler, to_k_ip/to_v_ip) and IdentityNet, a ControlNet of the UNet.
    with building(device, dtype, seed + 2):
        resampler = ImageResampler(
            sizes.resampler_dim,
            PerceiverConfig(clip_dim=512, depth=sizes.resampler_depth),
            sizes.identity_tokens,
            sizes.cross_attention_dim,
        )
        identitynet = ControlNetModel.from_unet(unet)
        ip = {}
        for index, name in cross:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for key in ("to_k_ip", "to_v_ip"):
                ip[f"{index}.{key}.weight"] = torch.randn(attn.to_k.out_features, sizes.cross_attention_dim) * (
                    sizes.cross_attention_dim**-0.5
                )
    unzero(identitynet.controlnet_down_blocks, identitynet.controlnet_mid_block)
    identitynet.set_attn_processor(AttnProcessor2_0())
    instantid = InstantID.load(unet, {"image_proj": resampler.state_dict(), "ip_adapter": ip}, identitynet)
    instantid_processors = dict(unet.attn_processors)
    unet.set_attn_processor(dict(plain_processors))
    embedding = torch.randn(512, generator=gen) * 20  # a raw antelopev2 embedding (norm ~ 20)
    tokens = instantid.identity_tokens(embedding).batch(1, classifier_free_guidance=True)
    kps = torch.rand(batch, 3, sizes.resolution, sizes.resolution, generator=gen).to(device, dtype)
    rows.append(
        Row(
            "sdxl+instantid",
            "+ InstantID (IdentityNet + IP branch)",
            lambda: (
                instantid.step(
                    sample, timestep, text, tokens, kps, added, ip_scale=0.8, conditioning_scale=0.8
                ).noise_pred
            ),
            extra_parameters=parameters(identitynet) + sum(t.numel() for t in ip.values()),
            tokens_ms=median_ms(lambda: instantid.identity_tokens(embedding), device),
            enter=lambda: unet.set_attn_processor(dict(instantid_processors)),
            leave=lambda: unet.set_attn_processor(dict(plain_processors)),
        )
    )

    # PuLID v1.1: the ID encoder (per call) and its processors on the cross-attention layers.
    config = IDFormerConfig(
        dim=sizes.idformer_dim,
        depth=sizes.idformer_depth,
        heads=sizes.idformer_dim // 64,
        num_id_token=5,
        num_queries=32,
        output_dim=sizes.cross_attention_dim,
        ff_mult=4,
        eva_width=sizes.eva_width,
        mapping_width=sizes.eva_width,
        id_cond_dim=512 + 768 * sizes.eva_width // 1024,
    )
    layers = {}
    for index, name in cross:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        layers[index] = (name, attn.to_k.out_features, attn.to_k.in_features)
    with building(device, dtype, seed + 3):
        pulid = frozen(PuLIDSDXL(config, layers), device, dtype)
    pulid.install(unet)
    pulid_processors = dict(unet.attn_processors)
    unet.set_attn_processor(dict(plain_processors))
    pulid_face = PuLIDFace(
        antelopev2=randn(512, std=20),
        eva_projection=randn(1, config.id_cond_dim - 512),
        eva_hidden=tuple(randn(1, sizes.eva_tokens, sizes.eva_width) for _ in range(config.scales)),
    )
    with torch.inference_mode():
        identity, no_identity = pulid.encode([pulid_face])
    pulid_tokens = PuLIDTokens(torch.cat([no_identity, identity]), 1.0, sizes.pulid_num_zero, sizes.pulid_ortho)
    rows.append(
        Row(
            "sdxl+pulid",
            f"+ PuLID v1.1 (ortho {sizes.pulid_ortho}, {sizes.pulid_num_zero} zero tokens)",
            lambda: unet_step(unet, cross_attention_kwargs={"ip_hidden_states": pulid_tokens}),
            extra_parameters=parameters(pulid.id_adapter_attn_layers),
            tokens_ms=median_ms(lambda: pulid.encode([pulid_face]), device),
            enter=lambda: unet.set_attn_processor(dict(pulid_processors)),
            leave=lambda: unet.set_attn_processor(dict(plain_processors)),
        )
    )
    notes["sdxl_method_parameters"] = {
        "faceid_projection": parameters(adapter.projection),
        "instantid_resampler": parameters(resampler),
        "pulid_id_encoder": parameters(pulid.id_adapter),
    }
    return rows


# ---------------------------------------------------------------------------------------------- FLUX
def flux_rows(sizes: FluxSizes, device: str, dtype: torch.dtype, seed: int, notes: dict) -> list[Row]:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    from faceid.methods.infiniteyou import InfiniteYou, denoise_step
    from faceid.methods.pulid import IDFormerConfig, PuLIDFace, PuLIDFlux, PuLIDIdentity, flux_ca_positions
    from faceid.projection import ImageResampler, PerceiverConfig

    with building(device, dtype, seed):
        transformer = FluxTransformer2DModel(**sizes.transformer_config())
    transformer = frozen(transformer, device, dtype)
    notes["flux_transformer_parameters"] = parameters(transformer)

    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    side = sizes.resolution // 16  # 1/8 latents, packed 2x2
    image_tokens = side * side
    hidden = randn(1, image_tokens, 64)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(sizes.text_tokens, 3, device=device, dtype=dtype)
    inputs = dict(
        hidden_states=hidden,
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
        pooled_projections=randn(1, sizes.pooled_dim),
        txt_ids=txt_ids,
        img_ids=img_ids,
    )
    prompt = randn(1, sizes.text_tokens, sizes.text_dim)
    notes["flux_image_tokens"] = image_tokens

    def plain() -> torch.Tensor:
        return transformer(**inputs, encoder_hidden_states=prompt, return_dict=False)[0]

    rows = [Row("flux", "FLUX.1 transformer, no method", plain)]

    # PuLID-FLUX v0.9.1: the ID encoder (per call) and the cross-attention modules between the blocks.
    double, single = flux_ca_positions(sizes.double_blocks, sizes.single_blocks)
    ca_count = 1 + max(k for k in double + single if k is not None)
    config = IDFormerConfig(
        dim=sizes.idformer_dim,
        depth=sizes.idformer_depth,
        heads=sizes.idformer_dim // 64,
        num_id_token=5,
        num_queries=32,
        output_dim=sizes.idformer_output,
        ff_mult=4,
        eva_width=sizes.eva_width,
        mapping_width=sizes.eva_width,
        id_cond_dim=512 + 768 * sizes.eva_width // 1024,
    )
    with building(device, dtype, seed + 2):
        pulid = frozen(
            PuLIDFlux(config, ca_count, dim=sizes.width, kv_dim=sizes.idformer_output, heads=sizes.ca_heads),
            device,
            dtype,
        )
    pulid_face = PuLIDFace(
        antelopev2=randn(512, std=20),
        eva_projection=randn(1, config.id_cond_dim - 512),
        eva_hidden=tuple(randn(1, sizes.eva_tokens, sizes.eva_width) for _ in range(config.scales)),
    )
    with torch.inference_mode():
        identity, _ = pulid.encode(pulid_face)
    pulid_kwargs = {"pulid": PuLIDIdentity(identity, 1.0)}
    rows.append(
        Row(
            "flux+pulid",
            f"+ PuLID-FLUX v0.9.1 ({ca_count} CA modules)",
            lambda: transformer(
                **inputs, encoder_hidden_states=prompt, joint_attention_kwargs=pulid_kwargs, return_dict=False
            )[0],
            extra_parameters=parameters(pulid.pulid_ca),
            tokens_ms=median_ms(lambda: pulid.encode(pulid_face), device),
            enter=lambda: pulid.attach(transformer),
            leave=lambda: PuLIDFlux.detach(transformer),
        )
    )

    # InfiniteYou: the Resampler (per call) and InfuseNet, a FLUX ControlNet reading the identity tokens.
    with building(device, dtype, seed + 3):
        image_proj = ImageResampler(
            sizes.resampler_dim, PerceiverConfig(clip_dim=512, depth=4), sizes.identity_tokens, sizes.text_dim
        )
        infusenet = FluxControlNetModel(
            patch_size=1,
            in_channels=64,
            num_layers=sizes.infusenet_double,
            num_single_layers=sizes.infusenet_single,
            attention_head_dim=sizes.head_dim,
            num_attention_heads=sizes.heads,
            joint_attention_dim=sizes.text_dim,
            pooled_projection_dim=sizes.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=sizes.rope_axes,
        )
    unzero(infusenet.controlnet_blocks, infusenet.controlnet_single_blocks, infusenet.controlnet_x_embedder)
    model = InfiniteYou(frozen(image_proj, device, dtype), frozen(infusenet, device, dtype))
    embedding = torch.randn(512, generator=gen)
    id_tokens = model.identity_tokens(embedding)
    control = randn(1, image_tokens, 64)  # the VAE-encoded, packed control image
    rows.append(
        Row(
            "flux+infiniteyou",
            f"+ InfiniteYou (InfuseNet {sizes.infusenet_double} double / {sizes.infusenet_single} single)",
            lambda: (
                denoise_step(
                    transformer,
                    model.infusenet,
                    **inputs,
                    prompt_embeds=prompt,
                    id_tokens=id_tokens,
                    controlnet_cond=control,
                    conditioning_scale=1.0,
                ).noise_pred
            ),
            extra_parameters=parameters(infusenet),
            tokens_ms=median_ms(lambda: model.identity_tokens(embedding), device),
        )
    )
    notes["flux_method_parameters"] = {
        "pulid_id_encoder": parameters(pulid.pulid_encoder),
        "infiniteyou_resampler": parameters(image_proj),
    }
    return rows


# ---------------------------------------------------------------------------------------------- running
def measure(rows: list[Row], args, device: str) -> None:
    """Warm-up, then ``repeats`` rounds in which each row (rotating order) runs ``steps`` timed steps."""
    with torch.inference_mode():
        for row in rows:
            row.enter()
            try:
                for _ in range(args.warmup):
                    row.step()
                sync(device)
            finally:
                row.leave()
        for round_ in range(args.repeats):
            shift = round_ % len(rows)
            for row in rows[shift:] + rows[:shift]:
                row.enter()
                try:
                    for _ in range(args.steps):
                        start, cpu_start = time.perf_counter(), time.process_time()
                        out = row.step()
                        sync(device)
                        row.times_ms.append((time.perf_counter() - start) * 1e3)
                        row.cpu_ms.append((time.process_time() - cpu_start) * 1e3)
                finally:
                    row.leave()
                row.output = out.float().cpu()
            print(
                f"#   round {round_ + 1}: "
                + ", ".join(f"{r.name} {statistics.median(r.times_ms[-args.steps :]):.1f} ms" for r in rows)
                + f"; {load_note()}",
                flush=True,
            )


def summarize(rows: list[Row]) -> list[dict]:
    base = rows[0]
    base_median = statistics.median(base.times_ms)
    base_cpu = statistics.median(base.cpu_ms)
    out = []
    for row in rows:
        median = statistics.median(row.times_ms)
        cpu = statistics.median(row.cpu_ms)
        diff = (row.output - base.output).abs().max().item()
        out.append(
            {
                "row": row.name,
                "label": row.label,
                "median_ms": median,
                "min_ms": min(row.times_ms),
                "max_ms": max(row.times_ms),
                "ratio_to_base": median / base_median,
                "cpu_median_ms": cpu,
                "cpu_ratio_to_base": cpu / base_cpu,
                "extra_parameters": row.extra_parameters,
                "tokens_ms": row.tokens_ms,
                "effect_vs_base": diff / max(base.output.abs().max().item(), 1e-12),
                "finite": bool(torch.isfinite(row.output).all()),
                "times_ms": row.times_ms,
                "cpu_times_ms": row.cpu_ms,
            }
        )
    return out


def print_table(family: str, results: list[dict], on_cpu: bool) -> None:
    """The table; on CPU also the process CPU time per step, steadier than wall time on a shared machine."""
    print()
    cpu_head = " CPU ms/step | x base (CPU) |" if on_cpu else ""
    print(
        f"| {family} | median ms/step | x base | min-max ms |{cpu_head} extra params (M) | tokens ms/call | "
        "effect vs base |"
    )
    print("|---|---:|---:|---:|" + ("---:|---:|" if on_cpu else "") + "---:|---:|---:|")
    for r in results:
        tokens = "" if r["tokens_ms"] is None else f"{r['tokens_ms']:.1f}"
        effect = "" if r is results[0] else f"{r['effect_vs_base']:.2f}"
        finite = "" if r["finite"] else " (non-finite output)"
        cpu = f" {r['cpu_median_ms']:.1f} | {r['cpu_ratio_to_base']:.3f} |" if on_cpu else ""
        print(
            f"| {r['row']}: {r['label']} | {r['median_ms']:.1f} | {r['ratio_to_base']:.3f} | "
            f"{r['min_ms']:.0f}-{r['max_ms']:.0f} |{cpu} {r['extra_parameters'] / 1e6:.1f} | {tokens} | {effect}{finite} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device, help=f"default: {default_device}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--scale", choices=tuple(SCALES), default=None, help="default: full on cuda, small on cpu")
    p.add_argument("--families", default="sdxl,flux", help="comma-separated: sdxl, flux (default both)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row per round (default 5 cuda, 1 cpu)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3 cuda, 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3 cuda, 1 cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on cpu: steady figures on a shared machine, where two threads on busy "
        "cores spin at barriers; 0 = torch's choice)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.scale = args.scale or ("full" if cuda else "small")
    args.steps = args.steps if args.steps is not None else (5 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else 3
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.threads = args.threads if args.threads is not None else (0 if cuda else 1)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    if not args.families or set(args.families) - set(FAMILIES):
        p.error(f"--families: a comma-separated subset of {', '.join(FAMILIES)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers
    import peft

    diffusers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    scale = SCALES[args.scale]
    if device == "cpu":
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    else:
        device_name = torch.cuda.get_device_name()
    print(
        f"# methods_step: scale {scale.name} ({scale.note}); random weights; device {device_name}, {args.dtype}; "
        f"{args.warmup} warm-up + {args.repeats} rounds x {args.steps} timed steps per row",
        flush=True,
    )
    print(f"# torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}", flush=True)

    report: dict = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/methods_step.py"] + (argv if argv is not None else sys.argv[1:])),
        "device": device_name,
        "dtype": args.dtype,
        "scale": scale.name,
        "scale_note": scale.note,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "families": {},
    }
    finite = True
    for family in args.families:
        sizes = scale.sdxl if family == "sdxl" else scale.flux
        print(f"# {family} sizes: {json.dumps(asdict(sizes))}", flush=True)
        notes: dict = {}
        start = time.perf_counter()
        build = sdxl_rows if family == "sdxl" else flux_rows
        rows = build(sizes, device, dtype, args.seed, notes)
        print(f"# built in {time.perf_counter() - start:.1f} s: {json.dumps(notes)}", flush=True)
        if family == "sdxl":
            print(
                f"# SDXL: batch 2 (CFG), {sizes.resolution} px ({sizes.resolution // 8}^2 latents), text "
                f"{sizes.text_tokens} tokens",
                flush=True,
            )
        else:
            print(
                f"# FLUX: batch 1, {sizes.resolution} px ({notes['flux_image_tokens']} image tokens), text "
                f"{sizes.text_tokens} tokens",
                flush=True,
            )
        measure(rows, args, device)
        results = summarize(rows)
        finite = finite and all(r["finite"] for r in results)
        print_table(family, results, on_cpu=device == "cpu")
        report["families"][family] = {"sizes": asdict(sizes), "notes": notes, "rows": results}
        del rows
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    print(f"# done; {load_note()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time one denoising step (one UNet forward) of SD1.5 with IP-Adapter-FaceID, four ways, in one run.

1. ``plain``          the diffusers SD1.5 UNet, no adapter;
2. ``diffusers``      diffusers' own FaceID path: ``StableDiffusionPipeline.load_ip_adapter`` (which calls
                      ``unet._load_ip_adapter_weights`` and loads the LoRA as the PEFT adapter ``faceid_0``),
                      identity passed as ``added_cond_kwargs={"image_embeds": [face embeddings]}``;
3. ``faceid``         this project, ``FaceIDAdapter.install`` (LoRA unfused), the identity as one call's tokens with
                      its key/value cache (``CallTokens``), the same at every step, as ``FaceIDPipeline`` runs it;
4. ``faceid-fused``   the same after ``adapter.fuse_lora()``.

Everything is random-weight and built locally (nothing is downloaded): the full-size SD1.5 UNet
architecture (or ``--tiny``), and an IP-Adapter-FaceID SD1.5 checkpoint in the official layout
(``image_proj``: MLP 512 -> 1024 -> 768*4 + LayerNorm; ``ip_adapter``: LoRA rank 128 on every attention
layer's to_q/k/v/out, ``to_k_ip``/``to_v_ip`` on every cross-attention layer) written with
``faceid.checkpoints.save_state_dict`` (fp16 ``.bin``, like the released file) and loaded from that file
by both adapters.

By default one UNet serves all four measurements, one after the other: ``plain`` first, then this
project's adapter (unfused, then fused; each installed and ``remove()``d -- the script checks that this
leaves the UNet bit for bit as it was: weights, modules, processors, requires_grad, and reports any
attribute left behind), and diffusers' path last (it is not undone). ``--interleave`` instead gives each
variant its own deep copy of the UNet (4x the weights in memory) and runs one step of each in turn with
a rotating order, so that load from other processes on a shared machine hits every variant alike; on a
shared CPU box also pass ``--threads 1`` (two OpenMP threads on two busy cores spin at barriers and
inflate both wall and CPU time). On CPU the table also gives the process CPU time per step.

The script also checks that paths 2, 3 and 4 give the same noise prediction for the same inputs (the
output of the last timed step of each), and prints how far they are from ``plain`` so the check is
known to be meaningful. Exit status 1 if an equality/restore check fails.

Usage::

    python benchmarks/bench_step.py                           # CUDA fp16 if available, else CPU fp32
    python benchmarks/bench_step.py --device cpu --steps 3 --warmup 1
    python benchmarks/bench_step.py --device cpu --steps 3 --warmup 1 --interleave --threads 1   # shared CPU box
    python benchmarks/bench_step.py --tiny --device cpu --steps 1 --warmup 0   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

VARIANTS = ("plain", "diffusers", "faceid", "faceid-fused")  # table order
# Measurement order on one UNet: this project's adapter is installed and removed (and the removal checked)
# before diffusers' path, which is not undone.
SEQUENTIAL_ORDER = ("plain", "faceid", "faceid-fused", "diffusers")
LABELS = {
    "plain": "plain SD UNet (no adapter)",
    "diffusers": "diffusers FaceID (load_ip_adapter, PEFT LoRA faceid_0)",
    "faceid": "faceid: install, LoRA unfused, a call's cache",
    "faceid-fused": "faceid: install + fuse_lora(), a call's cache",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative tolerance (max |a - b| / max |reference|) of the equality check, per compute dtype.
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
WEIGHT_NAME = "ip-adapter-faceid_sd15.bin"


# ---------------------------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=("cuda", "cpu"), default=default_device, help=f"default: {default_device}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant (default 3)")
    p.add_argument(
        "--batch",
        type=int,
        default=2,
        help="UNet batch (default 2 = classifier-free guidance of one image); must be even",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image size in pixels, latents are 1/8 of it (default 512; 64 with --tiny)",
    )
    p.add_argument("--text-tokens", type=int, default=77, help="text context length (default 77)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 128; 16 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a small UNet config for a quick smoke run")
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="relative tolerance of the equality check (default: fp32 1e-3, fp16 2e-2, bf16 5e-2)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="a UNet copy per variant (4x the weights in memory) and one step of each in turn, so that "
        "load from other processes on a shared machine hits all variants alike",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    args.resolution = args.resolution or (64 if args.tiny else 512)
    args.lora_rank = args.lora_rank or (16 if args.tiny else 128)
    args.rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even (unconditional half first, as with classifier-free guidance)")
    if args.resolution % 8:
        p.error("--resolution must be a multiple of 8")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def unet_config(tiny: bool) -> dict:
    """The standard SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), or a tiny one."""
    if tiny:
        return dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        center_input_sample=False,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
    )


def build_unet(config: dict, seed: int, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)  # random init on CPU: the same weights on every machine
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA everywhere
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_checkpoint(unet, rank: int, seed: int, num_tokens: int = 4, id_dim: int = 512, hidden: int = 1024) -> dict:
    """A random IP-Adapter-FaceID checkpoint in the official layout, sized for ``unet``.

    Magnitudes are chosen so that the identity branch and the LoRA change the UNet output visibly (the
    equality check must not pass trivially) without blowing it up: LoRA ``up(down(x))`` ~ 10-20% of ``W x``.
    """
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    cad = unet.config.cross_attention_dim
    image_proj = {
        "proj.0.weight": randn(hidden, id_dim, std=id_dim**-0.5),
        "proj.0.bias": randn(hidden, std=0.02),
        "proj.2.weight": randn(cad * num_tokens, hidden, std=hidden**-0.5),
        "proj.2.bias": randn(cad * num_tokens, std=0.02),
        "norm.weight": 1 + randn(cad, std=0.1),
        "norm.bias": randn(cad, std=0.1),
    }
    ip_adapter = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for target, linear in (
            ("to_q", attn.to_q),
            ("to_k", attn.to_k),
            ("to_v", attn.to_v),
            ("to_out", attn.to_out[0]),
        ):
            ip_adapter[f"{index}.{target}_lora.down.weight"] = randn(
                rank, linear.in_features, std=linear.in_features**-0.5
            )
            ip_adapter[f"{index}.{target}_lora.up.weight"] = randn(linear.out_features, rank, std=0.1 * rank**-0.5)
        if attn.is_cross_attention:
            assert index % 2 == 1, f"cross-attention layer at even index {index}: unexpected UNet layout"
            width = attn.to_k.out_features
            ip_adapter[f"{index}.to_k_ip.weight"] = randn(width, cad, std=cad**-0.5)
            ip_adapter[f"{index}.to_v_ip.weight"] = randn(width, cad, std=cad**-0.5)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def unet_fingerprint(unet) -> dict:
    """Everything ``adapter.remove()`` promises to restore: weights (bitwise), modules, processors, flags."""
    weights = {}
    for name, tensor in unet.state_dict().items():
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        weights[name] = (tuple(tensor.shape), str(tensor.dtype), hashlib.blake2b(data.data, digest_size=16).hexdigest())
    return {
        "weights": weights,
        "modules": [(name, type(m).__name__) for name, m in unet.named_modules()],
        "processors": {name: id(p) for name, p in unet.attn_processors.items()},
        "requires_grad": {name: p.requires_grad for name, p in unet.named_parameters()},
        "config_encoder_hid_dim_type": unet.config.encoder_hid_dim_type,
        "encoder_hid_proj": unet.encoder_hid_proj is None,
    }


def leftover_attributes(unet, before: dict) -> dict[str, str]:
    """Plain (non-module) attributes that appeared on ``unet`` since ``before = dict(vars(unet))``."""
    return {k: repr(v)[:80] for k, v in vars(unet).items() if k not in before and not k.startswith("_")}


def fingerprint_diff(before: dict, after: dict) -> list[str]:
    problems = []
    for key in before:
        if before[key] == after[key]:
            continue
        if isinstance(before[key], dict):
            changed = sorted(k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k))
            problems.append(f"{key}: {len(changed)} differ, e.g. {changed[:3]}")
        else:
            problems.append(f"{key} differs")
    return problems


# ---------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory over a block.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry; includes weights), and its rise over the
    memory allocated at entry. CPU: the process RSS sampled every ``interval`` s by a thread (after
    ``malloc_trim`` at entry so freed heap from earlier measurements does not hide the rise), and its rise
    over the RSS at entry.
    """

    def __init__(self, device: str, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = self.delta = 0

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self._proc = psutil.Process()
            self.base = self._max = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._proc.memory_info().rss)
        self.delta = self.peak - self.base
        return False


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    return {"max_abs_diff": diff, "rel_diff": diff / scale, "max_abs": scale}


def load_note() -> str:
    """The 1-minute load average (CPU runs: other processes on the machine skew the timings)."""
    try:
        return f"; load avg {os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def module_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    step: Callable[[], torch.Tensor]
    weights_bytes: int  # parameters + buffers of everything the step runs, on the device


@dataclass
class Inputs:
    latents: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    face: torch.Tensor  # (images, 512) L2-normalized, on CPU


@contextlib.contextmanager
def plain_variant(unet, inputs: Inputs, notes: dict):
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    yield Variant(
        lambda: unet(inputs.latents, inputs.timestep, encoder_hidden_states=inputs.text).sample, module_bytes(unet)
    )


@contextlib.contextmanager
def faceid_variant(unet, inputs: Inputs, notes: dict, ckpt_path: Path, fused: bool):
    """This project's adapter, as ``FaceIDPipeline`` runs it; ``remove()`` afterwards, checked."""
    from faceid.adapter import FaceIDAdapter
    from faceid.attention import CallTokens, FaceIDAttnProcessor, TokenGroup

    before, attributes_before = unet_fingerprint(unet), dict(vars(unet))
    adapter = FaceIDAdapter.install(unet, ckpt_path, scale=1.0, lora_scale=1.0)
    try:
        n_attn = len(unet.attn_processors)
        assert sum(isinstance(p, FaceIDAttnProcessor) for p in unet.attn_processors.values()) == n_attn // 2
        cond, uncond = adapter.identity_tokens(inputs.face)
        # UNet batch: unconditional half first. One call's tokens with its key/value cache, the same object at
        # every step, as a pipeline call passes them.
        tokens = CallTokens([TokenGroup(torch.cat([uncond, cond]), adapter.name, 1.0)])
        kwargs = {"ip_hidden_states": tokens}
        if fused:
            adapter.fuse_lora()
        yield Variant(
            lambda: (
                unet(
                    inputs.latents,
                    inputs.timestep,
                    encoder_hidden_states=inputs.text,
                    cross_attention_kwargs=kwargs,
                ).sample
            ),
            module_bytes(unet, adapter.projection),
        )
    finally:
        adapter.remove()
        problems = fingerprint_diff(before, unet_fingerprint(unet))
        leftovers = leftover_attributes(unet, attributes_before)
        notes.setdefault("remove_problems", []).extend(problems)
        notes.setdefault("remove_leftover_attributes", {}).update(leftovers)
        print(
            f"# adapter.remove() ({'fused' if fused else 'unfused'}) restored weights, modules, processors, "
            f"requires_grad bit for bit: {'yes' if not problems else 'NO: ' + '; '.join(problems)}",
            flush=True,
        )
        if leftovers:
            # Does not change what the UNet computes, but it is state remove() did not take back.
            # Dropped here so that the next measurement starts from a clean UNet.
            print(f"# NOTE: adapter.remove() left attributes on the UNet: {leftovers}; deleting them", flush=True)
            for key in leftovers:
                delattr(unet, key)


@contextlib.contextmanager
def diffusers_variant(unet, inputs: Inputs, notes: dict, ckpt_path: Path):
    """diffusers' own FaceID path: ``load_ip_adapter`` on a minimal pipeline around ``unet`` (not undone)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    # Calls unet._load_ip_adapter_weights (IPAdapterAttnProcessor2_0 + encoder_hid_proj) and loads the
    # LoRA from unet._load_ip_adapter_loras with pipe.load_lora_weights as PEFT adapter "faceid_0".
    pipe.load_ip_adapter(str(ckpt_path.parent), subfolder="", weight_name=ckpt_path.name, image_encoder_folder=None)
    procs = list(unet.attn_processors.values())
    n_attn = len(procs)
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in procs) == n_attn // 2
    assert all(isinstance(p, (IPAdapterAttnProcessor2_0, AttnProcessor2_0)) for p in procs)
    lora_layers = [m for m in unet.modules() if hasattr(m, "lora_A") and "faceid_0" in m.lora_A]
    assert len(lora_layers) == 4 * n_attn, f"diffusers loaded LoRA on {len(lora_layers)} layers, expected {4 * n_attn}"
    notes["diffusers_lora_scaling"] = sorted({m.scaling["faceid_0"] for m in lora_layers})
    # What diffusers' pipeline passes for FaceID: (2B, 1, 512), negative (zero embedding) half first; the
    # UNet's encoder_hid_proj turns it into identity tokens at every step.
    face = inputs.face.to(inputs.latents.device, inputs.latents.dtype)
    kwargs = {"image_embeds": [torch.cat([torch.zeros_like(face), face]).unsqueeze(1)]}
    yield Variant(
        lambda: (
            unet(inputs.latents, inputs.timestep, encoder_hidden_states=inputs.text, added_cond_kwargs=kwargs).sample
        ),
        module_bytes(unet),
    )


def make_variant(name: str, unet, inputs: Inputs, notes: dict, ckpt_path: Path):
    if name == "plain":
        return plain_variant(unet, inputs, notes)
    if name == "diffusers":
        return diffusers_variant(unet, inputs, notes, ckpt_path)
    return faceid_variant(unet, inputs, notes, ckpt_path, fused=name == "faceid-fused")


# ---------------------------------------------------------------------------------------------- runs
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, device: str) -> tuple[float, float, torch.Tensor]:
    """Wall-clock ms and process CPU ms (all threads) of one step, and its output."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = step()
    sync(device)
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3, out


def run_sequential(args, unet, inputs: Inputs, notes: dict, ckpt_path: Path) -> tuple[dict, dict]:
    """One UNet, one variant after the other: warm-up then timed steps; peak memory over the whole block."""
    measured, outputs = {}, {}
    for name in SEQUENTIAL_ORDER:
        with make_variant(name, unet, inputs, notes, ckpt_path) as variant:
            with PeakMemory(args.device) as memory, torch.inference_mode():
                for _ in range(args.warmup):
                    variant.step()
                sync(args.device)
                times, cpu_times = [], []
                for _ in range(args.steps):
                    ms, cpu_ms, out = timed(variant.step, args.device)
                    times.append(ms)
                    cpu_times.append(cpu_ms)
            outputs[name] = out.float().cpu()
            measured[name] = {
                "times_ms": times,
                "cpu_times_ms": cpu_times,
                "weights_mib": variant.weights_bytes / 2**20,
                "peak_mem_mib": memory.peak / 2**20,
                "mem_rise_mib": memory.delta / 2**20,
            }
            progress(name, measured[name])
    return measured, outputs


def run_interleaved(args, unet, inputs: Inputs, notes: dict, ckpt_path: Path) -> tuple[dict, dict]:
    """A UNet copy per variant, one step of each in turn (rotating order), so that load from other
    processes spreads over all variants alike. Memory: the rise of each step; peak = weights + max rise."""
    copies = {name: (unet if name == "plain" else copy.deepcopy(unet)) for name in VARIANTS}
    measured = {name: {"times_ms": [], "cpu_times_ms": [], "rises": []} for name in VARIANTS}
    outputs = {}
    with contextlib.ExitStack() as stack:
        variants = {
            name: stack.enter_context(make_variant(name, copies[name], inputs, notes, ckpt_path))
            for name in SEQUENTIAL_ORDER
        }
        with torch.inference_mode():
            for round_ in range(args.warmup + args.steps):
                order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
                for name in order:
                    with PeakMemory(args.device) as memory:
                        ms, cpu_ms, out = timed(variants[name].step, args.device)
                    if round_ >= args.warmup:
                        measured[name]["times_ms"].append(ms)
                        measured[name]["cpu_times_ms"].append(cpu_ms)
                        measured[name]["rises"].append(memory.delta)
                        outputs[name] = out.float().cpu()
                if round_ >= args.warmup:
                    print(
                        f"#   round {round_ - args.warmup + 1}: "
                        + ", ".join(f"{n} {measured[n]['times_ms'][-1]:.1f} ms" for n in order)
                        + load_note(),
                        flush=True,
                    )
        for name in VARIANTS:
            rise = max(measured[name].pop("rises"))
            measured[name].update(
                weights_mib=variants[name].weights_bytes / 2**20,
                peak_mem_mib=(variants[name].weights_bytes + rise) / 2**20,
                mem_rise_mib=rise / 2**20,
            )
    return measured, outputs


def progress(name: str, r: dict) -> None:
    times = r["times_ms"]
    print(
        f"#   {name:13s} mean {statistics.fmean(times):10.1f} ms  min {min(times):10.1f} ms  "
        f"peak {r['peak_mem_mib']:9.0f} MiB (rise {r['mem_rise_mib']:7.0f}); steps ms "
        f"{[round(t, 1) for t in times]}{load_note()}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    import diffusers
    import peft
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    from faceid.checkpoints import save_state_dict

    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cpu":
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    else:
        device_name = torch.cuda.get_device_name()
    if args.interleave:
        memory_kind = (
            "interleaved run: peak = weights + the largest rise of one step over the memory in use before "
            "it ("
            + (
                "torch.cuda.max_memory_allocated"
                if device == "cuda"
                else "process RSS sampled every 2 ms, after malloc_trim"
            )
            + ")"
        )
    elif device == "cuda":
        memory_kind = "torch.cuda.max_memory_allocated (incl. weights); rise = over memory allocated before warm-up"
    else:
        memory_kind = (
            "peak process RSS sampled every 2 ms (incl. weights, Python, libraries); rise = over RSS "
            "before warm-up (after malloc_trim)"
        )
    config = unet_config(args.tiny)
    latent = args.resolution // 8
    n_images = args.batch // 2
    print(
        f"# bench_step: {'tiny' if args.tiny else 'SD1.5 full-size'} UNet, random weights; device {device_name}, "
        f"{args.dtype}; batch {args.batch} (CFG of {n_images} image(s)), {args.resolution}px ({latent}x{latent} "
        f"latents), text {args.text_tokens} tokens; LoRA rank {args.lora_rank}; {args.warmup} warm-up + "
        f"{args.steps} timed steps; {'interleaved (one UNet copy per variant)' if args.interleave else 'sequential (one UNet)'}",
        flush=True,
    )
    print(
        f"# torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"transformers {transformers.__version__}",
        flush=True,
    )

    t0 = time.perf_counter()
    unet = build_unet(config, args.seed, device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"# UNet: {n_params / 1e6:.1f}M parameters, {len(unet.attn_processors)} attention processors; built in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    workdir = Path(tempfile.mkdtemp(prefix="bench_step_"))
    ckpt_path = save_state_dict(make_checkpoint(unet, args.lora_rank, args.seed), workdir / WEIGHT_NAME)

    gen = torch.Generator().manual_seed(args.seed + 2)  # the same inputs for every variant
    inputs = Inputs(
        latents=torch.randn(args.batch, 4, latent, latent, generator=gen).to(device, dtype),
        timestep=torch.tensor(500, device=device),
        text=torch.randn(args.batch, args.text_tokens, unet.config.cross_attention_dim, generator=gen).to(
            device, dtype
        ),
        face=torch.nn.functional.normalize(torch.randn(n_images, 512, generator=gen), dim=-1),
    )

    notes: dict = {}
    print("# measuring ...", flush=True)
    try:
        run = run_interleaved if args.interleave else run_sequential
        measured, outputs = run(args, unet, inputs, notes, ckpt_path)
    finally:
        ckpt_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            workdir.rmdir()

    # equality of the three adapter paths, and distance from plain (so the check is not trivial)
    checks = {
        "diffusers vs faceid": compare(outputs["diffusers"], outputs["faceid"]),
        "diffusers vs faceid-fused": compare(outputs["diffusers"], outputs["faceid-fused"]),
        "faceid vs faceid-fused": compare(outputs["faceid"], outputs["faceid-fused"]),
    }
    effect = compare(outputs["plain"], outputs["faceid"])
    equal = all(c["rel_diff"] <= args.rtol for c in checks.values())
    nontrivial = effect["rel_diff"] > 10 * args.rtol
    finite = all(torch.isfinite(o).all().item() for o in outputs.values())
    passed = equal and nontrivial and finite
    restore_problems = notes.get("remove_problems", [])
    leftovers = notes.get("remove_leftover_attributes", {})

    results = {}
    plain_mean = statistics.fmean(measured["plain"]["times_ms"])
    for name in VARIANTS:
        times = measured[name]["times_ms"]
        results[name] = {
            "label": LABELS[name],
            "mean_ms": statistics.fmean(times),
            "min_ms": min(times),
            "ratio_to_plain": statistics.fmean(times) / plain_mean,
            "cpu_mean_ms": statistics.fmean(measured[name]["cpu_times_ms"]),
            **measured[name],
        }
    plain_cpu = results["plain"]["cpu_mean_ms"]
    for r in results.values():
        r["cpu_ratio_to_plain"] = r["cpu_mean_ms"] / plain_cpu
    print()
    peak_head = "peak mem MiB (est.)" if args.interleave else "peak mem MiB"
    on_cpu = device == "cpu"  # process CPU time: less sensitive than wall time to other load on a shared machine
    cpu_head = " CPU-time ms/step (mean) | x plain (CPU time) |" if on_cpu else ""
    print(
        f"| variant | mean ms/step | min ms/step | x plain (mean) |{cpu_head} weights MiB | {peak_head} | mem rise MiB |"
    )
    print("|---|---:|---:|---:|" + ("---:|---:|" if on_cpu else "") + "---:|---:|---:|")
    for name in VARIANTS:
        r = results[name]
        cpu_cols = f" {r['cpu_mean_ms']:.1f} | {r['cpu_ratio_to_plain']:.3f} |" if on_cpu else ""
        print(
            f"| {name}: {r['label']} | {r['mean_ms']:.1f} | {r['min_ms']:.1f} | {r['ratio_to_plain']:.3f} |{cpu_cols} "
            f"{r['weights_mib']:.0f} | {r['peak_mem_mib']:.0f} | {r['mem_rise_mib']:.0f} |"
        )
    print()
    print(f"memory: {memory_kind}")
    print(f"diffusers LoRA scaling (PEFT lora_alpha / r) of adapter faceid_0: {notes.get('diffusers_lora_scaling')}")
    for name, c in checks.items():
        print(f"max |diff| {name}: {c['max_abs_diff']:.3e} (relative {c['rel_diff']:.3e})")
    print(f"adapter effect, max |faceid - plain|: {effect['max_abs_diff']:.3e} (relative {effect['rel_diff']:.3e})")
    print(
        f"equality check (relative tolerance {args.rtol:g}): {'PASSED' if passed else 'FAILED'}"
        + ("" if finite else " (non-finite output)")
        + ("" if nontrivial else " (adapter had no visible effect)")
    )
    print(
        f"remove() restore check: {'PASSED' if not restore_problems else 'FAILED'}"
        + (f" (but left attributes behind: {', '.join(leftovers)})" if leftovers else "")
    )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.date.today().isoformat(),
                    "command": " ".join(["benchmarks/bench_step.py"] + (argv if argv is not None else sys.argv[1:])),
                    "device": device_name,
                    "dtype": args.dtype,
                    "batch": args.batch,
                    "resolution": args.resolution,
                    "text_tokens": args.text_tokens,
                    "lora_rank": args.lora_rank,
                    "tiny": args.tiny,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "interleave": args.interleave,
                    "unet_parameters": n_params,
                    "versions": {
                        "torch": torch.__version__,
                        "diffusers": diffusers.__version__,
                        "peft": peft.__version__,
                        "transformers": transformers.__version__,
                    },
                    "memory_metric": memory_kind,
                    "results": results,
                    "equality": {
                        "rtol": args.rtol,
                        "passed": passed,
                        "checks": checks,
                        "adapter_effect_vs_plain": effect,
                        "diffusers_lora_scaling": notes.get("diffusers_lora_scaling"),
                    },
                    "remove_restores_unet": not restore_problems,
                    "remove_problems": restore_problems,
                    "remove_leftover_attributes": leftovers,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0 if (passed and not restore_problems) else 1


if __name__ == "__main__":
    sys.exit(main())

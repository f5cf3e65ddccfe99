#!/usr/bin/env python
"""End-to-end speed of FaceIDPipeline: images per second, face analysis included and excluded, for the
default mode (30 DDIM steps with classifier-free guidance, full VAE), each few-step preset, and compiled.

Everything is random-weight and built here, nothing is downloaded: the full-size SD1.5 architecture (UNet
859.5M parameters, the SD VAE, a 12-layer CLIP text encoder), an IP-Adapter-FaceID SD1.5 checkpoint in the
official layout (``bench_step.make_checkpoint``), a random TAESD-shaped ``AutoencoderTiny`` as the tiny
VAE, and each preset's LoRA as a random rank-64 LoRA in its published key layout on the same modules the
LCM-LoRA adapts. Random weights compute exactly as much as trained ones, so the timings stand (the
images are noise). The face is a real photo (``tests/data/faces/obama.jpg``) analysed by the tests'
offline face models (YuNet + a stand-in recogniser) unless ``--face-models`` gives the buffalo_l folder.

On CPU the figures to quote are the ratios to the default mode, measured in the same run; on CUDA (fp16)
the script also times one UNet pass at batch 1 against the H100's physical floor (0.80 TFLOP per SD1.5
512x512 pass at 989 dense fp16 TFLOPS: 0.81 ms) and the images/s of the fastest mode at batch 1, 4 and 16.

Usage::

    python benchmarks/bench_e2e.py                                    # CUDA fp16 if available, else CPU fp32
    python benchmarks/bench_e2e.py --device cpu --size 512 --repeats 1
    python benchmarks/bench_e2e.py --modes default,lcm --size 256     # quicker
    python benchmarks/bench_e2e.py --tiny                             # smoke run (tiny models, seconds)

Exit status 1 when the 4-step LCM mode with the tiny VAE is not at least ``--expect`` (10) times faster
end to end than the default mode (full size only).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' model builders and offline face models

from bench_step import build_unet, make_checkpoint, unet_config  # noqa: E402

H100_FLOOR_MS = 0.80e12 / 989e12 * 1e3  # one SD1.5 512x512 UNet pass at the H100's dense fp16 peak
FAST_MODES = ("lcm", "tcd", "hyper")  # SD1.5 presets (lightning is SDXL-only)
PHOTO = HERE.parent / "tests" / "data" / "faces" / "obama.jpg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on CUDA, else fp32")
    p.add_argument("--size", type=int, default=512, help="image width and height (default 512)")
    p.add_argument("--modes", default="default,lcm,lcm-full-vae,tcd,hyper", help="comma-separated")
    p.add_argument("--compile", action="store_true", help="also the lcm mode with the UNet compiled")
    p.add_argument("--repeats", type=int, default=None, help="timed images per mode (default: 3 CUDA, 1 CPU)")
    p.add_argument("--batches", default="1,4,16", help="CUDA: batch sizes for the images/s table")
    p.add_argument("--face-models", default=None, help="buffalo_l folder (default: the tests' offline models)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--expect", type=float, default=10.0, help="required speed-up of lcm (tiny VAE) over default")
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke run of the script itself")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- models
def build(args, folder: Path):
    """The FaceIDPipeline on random full-size (or tiny) SD1.5 weights, with a random tiny VAE."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline
    from face_helpers import make_test_face_models_dir
    from tiny_models import token_ids, vocab_size, write_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from faceid.adapter import FaceIDAdapter
    from faceid.checkpoints import save_state_dict
    from faceid.faces import FaceAnalyzer
    from faceid.pipeline import DDIM_OVERRIDES, FaceIDPipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet = build_unet(unet_config(args.tiny), seed=0, device="cpu", dtype=torch.float32)
    torch.manual_seed(1)
    if args.tiny:
        vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)  # fmt: skip
        tiny_vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                   num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))  # fmt: skip
        text_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    else:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)  # fmt: skip
        tiny_vae = AutoencoderTiny()  # TAESD's architecture (64 channels, 3 blocks per level)
        text_config = {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        }
    text_config["projection_dim"] = text_config["hidden_size"]
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=vocab_size(), max_position_embeddings=77, **text_config, **token_ids())
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **DDIM_OVERRIDES)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    checkpoint = save_state_dict(make_checkpoint(unet, rank=128, seed=0), folder / "ip-adapter-faceid_sd15.bin")
    from faceid.checkpoints import load_state_dict

    pipe.to(args.device, dtype)
    tiny_vae.to(args.device, dtype)
    adapter = FaceIDAdapter.install(pipe.unet, load_state_dict(checkpoint), label=checkpoint.name)
    face_models = Path(args.face_models) if args.face_models else make_test_face_models_dir(folder / "face-models")
    analyzer = FaceAnalyzer.from_dir(face_models)
    return FaceIDPipeline(
        pipe, adapter, face_analyzer=analyzer, base_model="random SD1.5", tiny_vae=tiny_vae, tiny_vae_source="random"
    )


def load_presets(pipe, folder: Path, modes) -> None:
    """Each preset's LoRA: random, rank 64, in the preset's key layout (tests/tiny_models.FEW_STEP_LAYOUTS)."""
    from safetensors.torch import save_file
    from tiny_models import FEW_STEP_LAYOUTS, few_step_lora_state

    for preset in sorted({m.split("-")[0] for m in modes if m.split("-")[0] in FAST_MODES}):
        path = folder / f"{preset}.safetensors"
        state = few_step_lora_state(pipe.pipe.unet, FEW_STEP_LAYOUTS[preset], rank=64, seed=len(preset))
        save_file(state, str(path))
        pipe.load_fast_lora(preset, path)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(call, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def mode_settings(mode: str, tiny_models: bool) -> dict:
    """The settings of a mode: the default (30 DDIM steps, guidance 7.5, full VAE) or a preset (with the tiny
    VAE unless the mode ends in ``-full-vae``)."""
    if mode == "default":
        return {"num_inference_steps": 3 if tiny_models else 30, "guidance_scale": 7.5, "decoder": "full"}
    return {"fast": mode.split("-")[0], "decoder": "full" if mode.endswith("full-vae") else "tiny"}


def unet_passes(settings: dict, images: int) -> int:
    from faceid.fast import PRESETS

    if "fast" in settings:
        return PRESETS[settings["fast"]].steps * images
    cfg = settings["guidance_scale"] > 1
    return settings["num_inference_steps"] * images * (2 if cfg else 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.device.startswith("cuda") else 1)
    size = 64 if args.tiny else args.size
    modes = [m for m in args.modes.split(",") if m]
    if args.compile:
        modes.append("lcm-compiled")
    from faceid.faces import FaceAnalyzer  # noqa: F401  (import cost outside the timings)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        pipe = build(args, folder)
        load_presets(pipe, folder, modes)
        print(f"built the random {'tiny' if args.tiny else 'full-size'} SD1.5 FaceID pipeline in "
              f"{time.perf_counter() - t0:.0f} s on {args.device} ({args.dtype}), {size}x{size}")  # fmt: skip
        face = pipe.face_analyzer.get(PHOTO)
        # Face analysis runs once per photo before the generation: timed on its own and added for the
        # "with face analysis" figures (a call given the photo does exactly both).
        analysis = statistics.median(timed(functools.partial(pipe.face_analyzer.get, PHOTO), "cpu") for _ in range(5))
        print(f"face analysis of {PHOTO.name}: {analysis * 1e3:.0f} ms")
        common = {"prompt": "a photo of a person", "width": size, "height": size, "output_type": "pil"}
        # warm-up: allocator, kernels, the face models' sessions
        pipe(face=str(PHOTO), seed=[0], num_inference_steps=1, guidance_scale=1.0, **common)

        rows = []
        for mode in modes:
            base = mode.removesuffix("-compiled")
            settings = mode_settings(base, args.tiny)
            if mode.endswith("compiled"):
                pipe.compile()
                first = timed(functools.partial(pipe, face=face, seed=[0], **settings, **common), args.device)
                print(f"  {mode}: first call (compiling) {first:.1f} s")
            # warm-up of this mode's own parts (its sampler, LoRA weights, decoder): one step
            pipe(face=face, seed=[0], **{**settings, **common, "num_inference_steps": 1})
            seconds = [
                timed(functools.partial(pipe, face=face, seed=[r], **settings, **common), args.device)
                for r in range(repeats)
            ]
            row = {
                "mode": mode,
                "decoder": f"{settings['decoder']} VAE",
                "unet_passes": unet_passes(settings, 1),
                "s_per_image": statistics.median(seconds),
                "s_per_image_with_face": statistics.median(seconds) + analysis,
            }
            rows.append(row)
            print(f"  {mode:14s} {row['decoder']:8s} {row['unet_passes']:3d} UNet passes  "
                  f"{row['s_per_image']:8.2f} s/image  ({row['s_per_image_with_face']:.2f} s with face analysis)")  # fmt: skip

        default = next((r for r in rows if r["mode"] == "default"), None)
        print()
        print("| mode | decoder | UNet passes | s/image | images/s | images/s with face analysis | speed-up |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            r["speedup"] = default["s_per_image"] / r["s_per_image"] if default else None
            r["speedup_with_face"] = default["s_per_image_with_face"] / r["s_per_image_with_face"] if default else None
            up = f"{r['speedup']:.1f}x ({r['speedup_with_face']:.1f}x)" if default else "-"
            print(f"| {r['mode']} | {r['decoder']} | {r['unet_passes']} | {r['s_per_image']:.3f} | "
                  f"{1 / r['s_per_image']:.3f} | {1 / r['s_per_image_with_face']:.3f} | {up} |")  # fmt: skip

        extra = {}
        if args.device.startswith("cuda"):
            extra = cuda_figures(pipe, face, size, args)

        status = 0
        lcm = next((r for r in rows if r["mode"] == "lcm"), None)
        if default and lcm:
            ok = lcm["speedup"] >= args.expect
            print(f"\n4-step LCM without guidance, tiny VAE: {lcm['speedup']:.1f}x faster end to end than the "
                  f"30-step default with the full VAE (face analysis excluded; {lcm['speedup_with_face']:.1f}x "
                  f"included); required {args.expect:g}x: {'PASS' if ok else 'FAIL'}")  # fmt: skip
            status = 0 if ok or args.tiny else 1
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, **extra}, indent=1))
    return status


def cuda_figures(pipe, face, size: int, args) -> dict:
    """ms per UNet pass at batch 1 against the H100 floor; images/s of the lcm mode at several batches."""
    unet = pipe.pipe.unet
    latents = torch.randn(1, 4, size // 8, size // 8, device=args.device, dtype=unet.dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, device=args.device, dtype=unet.dtype)
    t = torch.tensor(500, device=args.device)
    with torch.inference_mode():
        for _ in range(3):
            unet(latents, t, encoder_hidden_states=text)
        times = [timed(lambda: unet(latents, t, encoder_hidden_states=text), args.device) for _ in range(20)]
    ms = statistics.median(times) * 1e3
    print(f"\none UNet pass, batch 1, {size}x{size}: {ms:.2f} ms (H100 floor at 512x512: {H100_FLOOR_MS:.2f} ms)")
    throughput = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        seeds = list(range(batch))
        call = functools.partial(
            pipe, face=face, prompt="p", seed=seeds, fast="lcm", decoder="tiny", width=size, height=size,
            max_batch=batch,
        )  # fmt: skip
        call()  # warm-up
        seconds = timed(call, args.device)
        throughput[batch] = batch / seconds
        print(f"lcm, tiny VAE, batch {batch:2d}: {throughput[batch]:.1f} images/s")
    return {"unet_ms_batch1": ms, "h100_floor_ms": H100_FLOOR_MS, "lcm_images_per_s": throughput}


if __name__ == "__main__":
    sys.exit(main())

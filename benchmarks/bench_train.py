#!/usr/bin/env python
"""Training throughput of faceid's trainer: samples/s and peak memory, tiny and full-size SD1.5.

Builds the models with random weights in memory (nothing is downloaded): the full SD1.5 architecture
(UNet 860M, VAE, CLIP ViT-L/14 text encoder) or a tiny one, a FaceID adapter with LoRA rank 128 (16
tiny), and a synthetic dataset of random images and L2-normalised embeddings. Then it runs
`faceid.train.Trainer` for `--steps` optimizer steps after `--warmup` ones and reports the figures, so
GPU runs can be compared with these later.

    python benchmarks/bench_train.py --size tiny --device cpu
    python benchmarks/bench_train.py --size full --device cpu --steps 2 --warmup 1 --batch 1
    python benchmarks/bench_train.py --size full --device cuda --mixed-precision fp16 --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"  # the tests' CLIP tokenizer builder: nothing downloaded


def build_pipeline(size: str, tokenizer_dir: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    if size == "full":
        unet = UNet2DConditionModel(  # the SD1.5 configuration
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
        )  # fmt: skip
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
            )
        )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class SyntheticFaces(torch.utils.data.Dataset):
    def __init__(self, count: int, resolution: int):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(count, 3, resolution, resolution, generator=generator) * 2 - 1
        self.embeddings = torch.nn.functional.normalize(torch.randn(count, 512, generator=generator), dim=-1)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "caption": "a photo of a person", "id_embedding": self.embeddings[i]}


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--batch", type=int, default=None, help="per step (default 8 tiny / 1 full on CPU, 8 on GPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 full, 32 tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--tokenizer", default=None, help="a CLIP tokenizer folder (default: the tests' own, built here)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from accelerate import Accelerator

    from faceid.train import TrainConfig, Trainer

    full = args.size == "full"
    resolution = args.resolution or (512 if full else 32)
    batch = args.batch or (1 if full and args.device == "cpu" else 8)
    lora_rank = 128 if full else 16
    tokenizer = args.tokenizer
    if tokenizer is None:
        sys.path.insert(0, str(TESTS))
        from tiny_models import write_clip_tokenizer

        tokenizer = write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="tokenizer")))
    pipe = build_pipeline(args.size, Path(tokenizer))
    dataset = SyntheticFaces(batch * (args.steps + args.warmup), resolution)
    times = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            base_model="(in memory)", dataset="(in memory)", output_dir=out, resolution=resolution,
            train_batch_size=batch, lora_rank=lora_rank, max_train_steps=args.warmup + args.steps,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            checkpointing_steps=0, report_to="none",
        )  # fmt: skip
        accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
        trainer = Trainer(config, accelerator=accelerator, pipeline=pipe, dataset=dataset)
        original = Trainer.training_loss

        def timed(self, batch_, generator):
            if self.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            return original(self, batch_, generator)

        Trainer.training_loss = timed
        try:
            trainer.train()
        finally:
            Trainer.training_loss = original
    if args.device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter())
    step_times = [b - a for a, b in zip(times[args.warmup : -1], times[args.warmup + 1 :], strict=True)]
    mean = sum(step_times) / len(step_times)
    result = {
        "size": args.size, "device": args.device, "mixed_precision": args.mixed_precision, "batch": batch,
        "resolution": resolution, "lora_rank": lora_rank, "steps_timed": len(step_times),
        "seconds_per_step": mean, "samples_per_second": batch / mean,
        "peak_memory_mib": peak_memory_mib(args.device),
        "memory_kind": "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak process RSS",
        "trainable_parameters": sum(p.numel() for p in trainer.trainable_parameters()),
    }  # fmt: skip
    print(
        f"| {args.size} | {args.device} {args.mixed_precision} | {batch} x {resolution}px | "
        f"{mean:.3f} s/step | {batch / mean:.2f} samples/s | {result['peak_memory_mib']:.0f} MiB "
        f"({result['memory_kind']}) | {result['trainable_parameters'] / 1e6:.1f}M trainable |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

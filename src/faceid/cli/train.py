"""``faceid train``: train or fine-tune an adapter on a prepared dataset (several GPUs: ``accelerate launch -m
faceid.cli train``)."""

from __future__ import annotations

import argparse

from ..errors import FaceIDError
from .logs import quiet_model_loading


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid train``: a config file, and flags for its common settings."""
    parser.add_argument("--config", default=None, help="YAML/JSON file of training settings (configs/*.yaml)")
    for flag, kind, text in (
        ("--base-model", str, "SD1.5/SDXL base model (Hub repo id or diffusers folder)"),
        ("--dataset", str, "folder written by `faceid prepare`"),
        ("--output-dir", str, "where checkpoints, logs and the exported adapter go"),
        ("--variant", str, "faceid | plus | plusv2 | portrait"),
        ("--init-adapter", str, "start from this adapter checkpoint (fine-tuning)"),
        ("--image-encoder", str, "Plus: CLIP ViT-H image encoder folder or repo"),
        ("--max-train-steps", int, "optimizer steps"),
        ("--train-batch-size", int, "images per device per step"),
        ("--gradient-accumulation-steps", int, "micro-batches per optimizer step"),
        ("--learning-rate", float, "AdamW learning rate (1e-4)"),
        ("--resolution", int, "training resolution (512)"),
        ("--lora-rank", int, "identity LoRA rank (128)"),
        ("--mixed-precision", str, "no | fp16 | bf16"),
        ("--checkpointing-steps", int, "save a checkpoint every N steps"),
        ("--validation-steps", int, "validate every N steps (0: never)"),
        ("--face-models", str, "face detector + recognizer folder for validation"),
        ("--report-to", str, "tensorboard | none"),
        ("--seed", int, "seed of the data order, noise and dropout"),
    ):
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in the output folder")
    parser.add_argument("--validation-face", action="append", default=None, help="photo to validate on (repeatable)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save memory")
    parser.add_argument("--use-8bit-adam", action="store_true", default=None, help="bitsandbytes AdamW8bit")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting of TrainConfig"
    )


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from ..train import TrainConfig, Trainer

    overrides = {
        key: getattr(args, key)
        for key in (
            "base_model",
            "dataset",
            "output_dir",
            "variant",
            "init_adapter",
            "image_encoder",
            "max_train_steps",
            "train_batch_size",
            "gradient_accumulation_steps",
            "learning_rate",
            "resolution",
            "lora_rank",
            "mixed_precision",
            "checkpointing_steps",
            "validation_steps",
            "face_models",
            "report_to",
            "seed",
            "gradient_checkpointing",
            "use_8bit_adam",
        )
    }
    overrides["resume_from_checkpoint"] = args.resume
    overrides["validation_faces"] = args.validation_face
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise FaceIDError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    config = TrainConfig.from_file(args.config, **overrides)
    quiet_model_loading()
    trainer = Trainer(config)
    result = trainer.train()
    if not result["stopped"] and result["is_main_process"]:
        processes = result["num_processes"]
        print(
            f"trained {result['global_step']} steps on {processes} process{'es' if processes > 1 else ''} "
            f"({result['samples_per_second']:.2f} samples/s); "
            f"adapter written to {config.output_dir}/{trainer.export_name}.bin and .safetensors"
        )
    return 0

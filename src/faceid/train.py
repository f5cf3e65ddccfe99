"""Training and fine-tuning IP-Adapter-FaceID adapters (SPEC.md section 5), on accelerate.

What is trained: the identity projection, every cross-attention layer's ``to_k_ip``/``to_v_ip``
(initialised from the layer's own ``to_k``/``to_v``) and the identity LoRA (``up`` starts at zero). The
VAE, the text encoder(s) and the UNet's own weights stay frozen. The adapter is installed with the same
``FaceIDAdapter`` that inference uses, so a trained adapter is exactly what the pipeline later loads, and
the dropped-identity input (a zero embedding; for Plus also the CLIP features of a zero image) is the
same unconditional input that inference uses for classifier-free guidance.

Runs on one device or many (``accelerate launch``: DDP, or DeepSpeed ZeRO-2 with the shipped config).
Checkpoints hold only what is trained, plus the optimizer, the LR schedule and the step; the random
numbers of step *k* come from a generator seeded by (seed, k, process), and the data order of every epoch
from (seed, epoch), so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapter import FaceIDAdapter, initial_state_dict
from .atomic import atomic_write
from .checkpoints import load_state_dict, save_state_dict
from .errors import FaceIDError
from .projection import PerceiverConfig
from .variants import ARCHITECTURES

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"  # inside each checkpoint folder: the trained weights, official layout


def export_name(plus: bool, shortcut: bool, portrait: bool) -> str:
    """The released adapters' file name stem for what was trained (the base model family is not in it)."""
    if portrait:
        return "ip-adapter-faceid-portrait"
    if plus:
        return "ip-adapter-faceid-plusv2" if shortcut else "ip-adapter-faceid-plus"
    return "ip-adapter-faceid"


@dataclass
class TrainConfig:
    """Every setting of a training run; defaults are the published recipe for FaceID SD1.5."""

    base_model: str = ""  # SD1.5/SDXL: diffusers folder or Hub repo id
    dataset: str = ""  # a folder written by `faceid prepare`
    output_dir: str = "faceid-training"
    variant: str = "faceid"  # faceid | plus | plusv2 | portrait (faceid.variants; init_adapter: the file's)
    init_adapter: str | None = None  # start from this checkpoint (fine-tuning), e.g. a released file
    num_tokens: int | None = None  # default: the variant's (4; 16 per face for portrait)
    lora_rank: int | None = 128  # None: no LoRA (portrait default)
    image_encoder: str | None = None  # Plus: CLIP ViT-H folder/repo (default h94/IP-Adapter models/image_encoder)
    shortcut: bool | None = None  # Plus: tokens + perceiver (PlusV2) or perceiver alone; None: the variant's
    resolution: int = 512
    hflip: bool = False
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_train_steps: int = 1000
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    seed: int = 42
    drop_id: float = 0.05  # probability of dropping the identity (zero embedding)
    drop_text: float = 0.05  # ... the caption (empty prompt)
    drop_both: float = 0.05  # ... both
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    validation_steps: int = 0  # 0: no validation
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a person, best quality"])
    validation_faces: list[str] = field(default_factory=list)  # photos of the people to validate on
    validation_inference_steps: int = 30
    face_models: str | None = None  # for validation: face detector + recognizer folder (buffalo_l)
    dataloader_num_workers: int = 0
    report_to: str = "tensorboard"  # tensorboard | none
    # The exported files' name; None: the variant's, as the releases name theirs (ip-adapter-faceid,
    # -plus, -plusv2, -portrait), so that a PlusV2 export loads with its shortcut on (the name tells Plus from
    # PlusV2: their tensors are the same).
    export_name: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
        """A config from a YAML/JSON file, with ``overrides`` (e.g. from command-line flags) on top."""
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        hints = typing.get_type_hints(cls)
        known = set(hints)
        unknown = sorted(set(values) - known)
        if unknown:
            raise FaceIDError(f"unknown training settings in {path}: {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - known)
        if unknown:
            raise FaceIDError(f"unknown training settings: {', '.join(unknown)}")
        config = cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})
        config.validate()
        return config

    def validate(self) -> None:
        if not self.base_model or not self.dataset:
            raise FaceIDError("training needs base_model (the SD model) and dataset (a `faceid prepare` folder)")
        if self.variant not in ARCHITECTURES:
            raise FaceIDError(f"variant must be one of {', '.join(ARCHITECTURES)}, not {self.variant!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise FaceIDError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")
        if not 0 <= self.drop_id + self.drop_text + self.drop_both <= 1:
            raise FaceIDError("the three drop probabilities must add up to at most 1")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """YAML reads ``1e-4`` as a string and flags arrive as text: convert to the setting's own type."""
    if value is None:
        return None
    if typing.get_origin(hint) is list:
        return [value] if isinstance(value, str) else list(value)
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]  # X | None -> X
    kind = kinds[0] if kinds else str
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind in (int, float, str, bool):
            return kind(value)
    except (TypeError, ValueError):
        raise FaceIDError(f"training setting {key}: {value!r} is not a {kind.__name__}") from None
    return value


# ---------------------------------------------------------------------------------------------------
class TrainableFaceID(nn.Module):
    """The UNet (frozen, with the adapter's processors and LoRA inside) and the projection, as one module
    so that DDP/DeepSpeed see every trainable parameter in one forward."""

    def __init__(self, unet: nn.Module, projection: nn.Module):
        super().__init__()
        self.unet = unet
        self.projection = projection

    def forward(
        self, noisy_latents, timesteps, text_embeds, id_embeds, clip_embeds=None, added_cond_kwargs=None, shortcut=False
    ):
        tokens = self.projection(id_embeds, clip_embeds, shortcut=shortcut)
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=text_embeds,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={"ip_hidden_states": tokens.to(text_embeds.dtype)},
        ).sample


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, from (seed, epoch) alone: the data order survives a resume."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def step_generator(seed: int, step: int, process: int, device) -> torch.Generator:
    """The random numbers of one micro-step of one process (noise, timesteps, dropout, VAE sample)."""
    device = torch.device(device)
    generator = torch.Generator(device if device.type != "mps" else "cpu")
    return generator.manual_seed((seed * 1_000_003 + step * 7919 + process * 104_729) % (2**63))


# ---------------------------------------------------------------------------------------------------
class Trainer:
    """One training run: ``Trainer(config).train()``."""

    def __init__(self, config: TrainConfig, accelerator=None, pipeline=None, dataset=None):
        """``pipeline`` / ``dataset``: ready objects instead of ``config.base_model`` / ``config.dataset``
        (benchmarks and notebooks build them in memory)."""
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

        self.config = config
        out = Path(config.output_dir)
        handlers = []
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
            # accelerate picks no process-group backend for DeepSpeed without GPUs, then counts one process
            # and DeepSpeed refuses the batch size; DeepSpeed's CPU accelerator talks gloo.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
            kwargs_handlers=handlers,
        )
        self._check_launch()
        self._stop_requested = False
        self.history: list[dict[str, float]] = []
        self._given_pipeline, self._given_dataset = pipeline, dataset
        self._gap_batches: list[dict] | None = None  # the fixed images validation measures the identity gap on

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _check_launch(self) -> None:
        """Refuse launches that would silently train something else than the configuration says."""
        acc, cfg = self.accelerator, self.config
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and acc.num_processes == 1:
            raise FaceIDError(
                f"{launched} processes were launched but accelerate sees only this one, so each would train alone. "
                "Without GPUs, set ACCELERATE_USE_CPU=true (DDP on CPU) or DS_ACCELERATOR=cpu (DeepSpeed)."
            )
        if acc.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
            raise FaceIDError(
                f"the accelerate config accumulates {acc.gradient_accumulation_steps} batches per step but the "
                f"training config says gradient_accumulation_steps: {cfg.gradient_accumulation_steps}; make them equal"
            )
        if self.deepspeed:
            clipping = acc.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
            if clipping not in (None, "auto") and float(clipping) != float(cfg.max_grad_norm):
                raise FaceIDError(
                    f"DeepSpeed clips gradients at {clipping} (the accelerate config's gradient_clipping) but the "
                    f"training config says max_grad_norm: {cfg.max_grad_norm}; make them equal"
                )

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from diffusers import DDPMScheduler, DiffusionPipeline

        from .data import FaceDataset
        from .hub import model_not_found, offline

        cfg, acc = self.config, self.accelerator
        if self._given_dataset is None:
            from .data import read_dataset_info

            read_dataset_info(cfg.dataset)  # a wrong dataset path fails now, not after minutes of model loading
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        if self._given_pipeline is not None:
            self.pipe = self._given_pipeline
        else:
            try:
                self.pipe = DiffusionPipeline.from_pretrained(cfg.base_model, local_files_only=offline())
            except Exception as exc:
                raise model_not_found(cfg.base_model, exc) from exc
        self.pipe.set_progress_bar_config(disable=True)
        self.sdxl = hasattr(self.pipe, "text_encoder_2")
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).to(acc.device)
                # the SD VAE overflows in fp16 when encoding: it stays in fp32 then
                if self.weight_dtype != torch.float32 and not (name == "vae" and cfg.mixed_precision == "fp16"):
                    module.to(dtype=self.weight_dtype)
        unet = self.pipe.unet.requires_grad_(False)

        state = load_state_dict(cfg.init_adapter) if cfg.init_adapter else self._fresh_state(unet)
        self.adapter = FaceIDAdapter.install(
            unet, state, label=Path(cfg.init_adapter).name if cfg.init_adapter else None
        )
        self.plus = self.adapter.projection.needs_clip
        # The variant's shortcut default: the config's variant, or for a file the one its tensors and name say.
        variant = (
            self.adapter.spec.architecture(Path(cfg.init_adapter).name)
            if cfg.init_adapter
            else ARCHITECTURES[cfg.variant]
        )
        self.shortcut = variant.shortcut if cfg.shortcut is None else cfg.shortcut
        self.export_name = cfg.export_name or export_name(self.plus, self.shortcut, variant.name == "portrait")
        unet.to(acc.device)
        if self.weight_dtype != torch.float32:
            unet.to(dtype=self.weight_dtype)
        trainable = self.trainable_parameters()
        for param in trainable:  # trainable weights in fp32, whatever the frozen ones are
            param.data = param.data.float()
            param.requires_grad_(True)
        self.adapter.projection.to(acc.device, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.model = TrainableFaceID(unet, self.adapter.projection)

        self.image_encoder = None
        if self.plus:
            from .identity import CLIPFaceEncoder

            self.image_encoder = CLIPFaceEncoder.from_pretrained(
                cfg.image_encoder, dtype=self.weight_dtype, device=acc.device
            )

        dataset = self._given_dataset or FaceDataset(
            cfg.dataset, resolution=cfg.resolution, with_crops=self.plus, hflip=cfg.hflip
        )
        if len(dataset) == 0:
            raise FaceIDError(f"the dataset {cfg.dataset} has no images")
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), cfg.seed)
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            sampler=self.sampler,
            num_workers=cfg.dataloader_num_workers,
            collate_fn=_collate,
            drop_last=True,
        )
        optimizer = self._optimizer(trainable)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
            num_training_steps=cfg.max_train_steps * acc.num_processes,
        )
        self.model, self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            self.model, optimizer, dataloader, lr_scheduler
        )
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        if acc.is_main_process and cfg.report_to != "none":
            acc.init_trackers("faceid", config={k: str(v) for k, v in asdict(cfg).items()})

    def _fresh_state(self, unet) -> dict:
        cfg = self.config
        variant = ARCHITECTURES[cfg.variant]
        perceiver = None
        if variant.needs_clip:
            from .identity import CLIPFaceEncoder

            encoder = CLIPFaceEncoder.from_pretrained(cfg.image_encoder)
            perceiver = PerceiverConfig(clip_dim=encoder.hidden_size)
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the projection's default initialisation
        return initial_state_dict(
            unet,
            num_tokens=cfg.num_tokens or variant.tokens_per_face,
            lora_rank=cfg.lora_rank if variant.lora_rank is not None else None,
            perceiver=perceiver,
            generator=generator,
        )

    def trainable_parameters(self) -> list[nn.Parameter]:
        adapter = self.adapter
        params = list(adapter.projection.parameters())
        for branch in adapter.branches.values():
            params += [branch.to_k_ip.weight, branch.to_v_ip.weight]
        for path in adapter._lora_layers:
            layer = adapter.unet.get_submodule(path)
            params += [layer.lora_A[adapter.name].weight, layer.lora_B[adapter.name].weight]
        return params

    def _optimizer(self, params):
        cfg = self.config
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise FaceIDError("use_8bit_adam needs bitsandbytes: pip install 'faceid[train8bit]'") from exc
            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        return cls(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ checkpoints
    def _save_hook(self, models, weights, output_dir) -> None:
        """Checkpoints hold the trained weights (official layout), not the frozen UNet."""
        if self.accelerator.is_main_process:
            save_state_dict(self.adapter.state_dict(), Path(output_dir) / ADAPTER_FILE, dtype=torch.float32)
        weights.clear()

    def _load_hook(self, models, input_dir) -> None:
        state = load_state_dict(Path(input_dir) / ADAPTER_FILE)
        self.load_adapter_weights(state)
        models.clear()

    def load_adapter_weights(self, state: dict) -> None:
        """Copy an official-layout state dict into the live trainable modules (same shapes)."""
        with torch.no_grad():
            current = self.adapter.state_dict()
            for group in current:
                for key, tensor in current[group].items():
                    tensor.copy_(state[group][key])

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoint-<step>`` written under a temporary name and renamed: never half a checkpoint."""
        acc, out = self.accelerator, Path(self.config.output_dir)
        final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        # DeepSpeed saves its engine's whole module unless told to leave the frozen UNet out.
        acc.save_state(str(tmp), **({"exclude_frozen_parameters": True} if self.deepspeed else {}))
        acc.wait_for_everyone()  # every process has written its part (ZeRO shards) before the rename
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.config.checkpoints_total_limit
        if not limit:
            return
        for old in list_checkpoints(self.config.output_dir)[:-limit]:
            shutil.rmtree(old)

    def _resume(self) -> int:
        target = self.config.resume_from_checkpoint
        if not target:
            return 0
        if target == "latest":
            found = list_checkpoints(self.config.output_dir)
            if not found:
                logger.info("no checkpoint to resume from in %s; starting fresh", self.config.output_dir)
                return 0
            target = found[-1]
        path = Path(target)
        if not (path / ADAPTER_FILE).is_file():
            raise FaceIDError(f"{path} is not a faceid training checkpoint (no {ADAPTER_FILE})")
        self.accelerator.load_state(str(path), **({"load_module_strict": False} if self.deepspeed else {}))
        return json.loads((path / "trainer_state.json").read_text())["global_step"]

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        cfg, acc = self.config, self.accelerator
        self.setup()
        global_step = self._resume()
        batches_per_epoch = len(self.dataloader)
        if batches_per_epoch == 0:
            raise FaceIDError(
                f"the dataset is smaller than one batch ({cfg.train_batch_size} x {acc.num_processes} processes)"
            )
        with self._stop_on_signals():
            global_step, samples, elapsed = self._run_steps(global_step, batches_per_epoch)
        if self._stop_requested:
            path = self.save_checkpoint(global_step)
            if acc.is_main_process:
                print(f"faceid: training stopped at step {global_step}; resume with --resume {path}")
        else:
            self.export()
        acc.end_training()
        return {
            "global_step": global_step,
            "samples_per_second": samples / elapsed if elapsed else 0.0,
            "stopped": self._stop_requested,
            "num_processes": acc.num_processes,
            "is_main_process": acc.is_main_process,
        }

    def _run_steps(self, global_step: int, batches_per_epoch: int) -> tuple[int, int, float]:
        """Optimizer steps from ``global_step`` until the last one or a stop request: (step, samples, seconds)."""
        cfg, acc = self.config, self.accelerator
        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.max_train_steps, initial=global_step, disable=not acc.is_local_main_process, desc="training"
        )
        micro_step = global_step * cfg.gradient_accumulation_steps
        started = time.perf_counter()
        samples = 0
        self.model.train()
        while global_step < cfg.max_train_steps and not self._stop_requested:
            epoch, done_in_epoch = divmod(micro_step, batches_per_epoch)
            loader = acc.skip_first_batches(self.dataloader, done_in_epoch) if done_in_epoch else self.dataloader
            # accelerate's loaders re-seed their sampler with their own iteration count when iterated; set
            # it from the step count instead, so that a resumed run sees the same order.
            loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            for batch in loader:
                with acc.accumulate(self.model):
                    loss = self.training_loss(
                        batch, step_generator(cfg.seed, micro_step, acc.process_index, acc.device)
                    )
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
                micro_step += 1
                samples += batch["pixel_values"].shape[0] * acc.num_processes
                if not acc.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                loss_value = acc.gather(loss.detach()[None]).mean().item()
                record = {"loss": loss_value, "lr": self.lr_scheduler.get_last_lr()[0], "step": global_step}
                self.history.append(record)
                progress.set_postfix(loss=f"{loss_value:.4f}")
                if cfg.report_to != "none":
                    acc.log({"train/loss": loss_value, "train/lr": record["lr"]}, step=global_step)
                if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint(global_step)
                if cfg.validation_steps and global_step % cfg.validation_steps == 0:
                    self.validate(global_step)
                if global_step >= cfg.max_train_steps or self._stop_requested:
                    break
        progress.close()
        return global_step, samples, time.perf_counter() - started

    def training_loss(
        self,
        batch: dict,
        generator: torch.Generator,
        model: nn.Module | None = None,
        dropout: tuple[float, float, float] | None = None,
    ) -> torch.Tensor:
        """The published objective: MSE between the predicted and the true noise (or v), with dropout.

        ``model``: another module to run than the prepared (DDP/DeepSpeed-wrapped) one, e.g. the unwrapped model
        for an evaluation on one process only. ``dropout``: the odds of dropping (identity, text, both); by
        default the configuration's."""
        cfg, acc = self.config, self.accelerator
        p_id, p_text, p_both = (cfg.drop_id, cfg.drop_text, cfg.drop_both) if dropout is None else dropout
        device = acc.device
        pixel_values = batch["pixel_values"].to(device, dtype=self.pipe.vae.dtype)
        bsz = pixel_values.shape[0]
        with torch.no_grad():
            latents = self.pipe.vae.encode(pixel_values).latent_dist.sample(generator=generator)
            latents = (latents * self.pipe.vae.config.scaling_factor).to(self.weight_dtype)
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=device
        ).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        # Conditioning dropout for classifier-free guidance: [identity | text | both] with the given odds.
        draw = torch.rand(bsz, generator=generator, device=device).cpu()
        drop_id = draw < p_id
        drop_text = (draw >= p_id) & (draw < p_id + p_text)
        drop_both = (draw >= p_id + p_text) & (draw < p_id + p_text + p_both)
        drop_id, drop_text = drop_id | drop_both, drop_text | drop_both
        id_embeds = batch["id_embedding"].to(device, torch.float32)
        id_embeds = torch.where(drop_id.to(device)[:, None], torch.zeros_like(id_embeds), id_embeds)
        captions = ["" if dropped else caption for caption, dropped in zip(batch["caption"], drop_text, strict=True)]

        with torch.no_grad():
            text = self.pipe.encode_prompt(
                captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        text_embeds = text[0].to(self.weight_dtype)
        added_cond_kwargs = None
        if self.sdxl:
            size = cfg.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * bsz, device=device, dtype=self.weight_dtype)
            added_cond_kwargs = {"text_embeds": text[2].to(self.weight_dtype), "time_ids": time_ids}
        clip_embeds = None
        if self.plus:
            clip_embeds = self._clip_features(batch["clip_image"], drop_id)

        prediction = (self.model if model is None else model)(
            noisy, timesteps, text_embeds, id_embeds, clip_embeds, added_cond_kwargs, shortcut=self.shortcut
        )
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")

    @torch.no_grad()
    def _clip_features(self, crops: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        pixels, features, uncond = self.image_encoder(list(crops.numpy()))
        # A dropped identity sees what inference's unconditional branch sees: a zero pixel tensor.
        return torch.where(dropped.to(features.device)[:, None, None], uncond, features).float()

    @torch.no_grad()
    def identity_loss(self, batches: list[dict], shuffle: bool, seed: int = 0) -> float:
        """Mean denoising loss over ``batches`` with each image's own identity, or with identities shuffled.

        No dropout; the same noise and timesteps for both, so the gap measures how much the adapter uses
        the identity.
        """
        model = self.accelerator.unwrap_model(self.model)  # no collective ops: one process may run this alone
        self.model.eval()
        try:
            losses = []
            for i, batch in enumerate(batches):
                if shuffle:
                    batch = dict(batch)
                    order = torch.roll(torch.arange(len(batch["caption"])), 1)
                    batch["id_embedding"] = batch["id_embedding"][order]
                    if "clip_image" in batch:
                        batch["clip_image"] = batch["clip_image"][order]
                generator = step_generator(seed, i, 0, self.accelerator.device)
                losses.append(self.training_loss(batch, generator, model, dropout=(0.0, 0.0, 0.0)).item())
            return sum(losses) / len(losses)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ validation and export
    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Every ``validation_steps``: the identity gap (always) and, for the validation faces x prompts,
        images with their identity similarity. Logged (TensorBoard), kept in the history, and returned."""
        cfg, acc = self.config, self.accelerator
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            metrics.update(self._identity_gap())
            if cfg.validation_faces:
                metrics.update(self._validation_images(step))
            if self.history and self.history[-1]["step"] == step:
                self.history[-1].update({key.split("/")[-1]: value for key, value in metrics.items()})
            if cfg.report_to != "none" and metrics:
                acc.log(metrics, step=step)
        acc.wait_for_everyone()
        return metrics

    def _identity_gap(self) -> dict[str, float]:
        """Denoising loss on fixed images with their own identity and with the identities shuffled among
        them: how much the adapter uses the identity (0 before training; it grows as the adapter learns)."""
        if self._gap_batches is None:
            size = min(len(self.dataset), max(2, self.config.train_batch_size))
            count = min(4, len(self.dataset) // size) if size >= 2 else 0
            # Read once; fork_rng keeps a random hflip here from moving the training's random numbers.
            with torch.random.fork_rng(devices=[]):
                self._gap_batches = [_collate([self.dataset[i * size + j] for j in range(size)]) for i in range(count)]
        batches = self._gap_batches
        if not batches:
            return {}
        own = self.identity_loss(batches, shuffle=False, seed=self.config.seed)
        shuffled = self.identity_loss(batches, shuffle=True, seed=self.config.seed)
        return {
            "validation/loss_own_identity": own,
            "validation/loss_shuffled_identity": shuffled,
            "validation/identity_gap": shuffled / own - 1.0,
        }

    def _validation_images(self, step: int) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        from .faces import FaceAnalyzer
        from .outputs import contact_sheet
        from .pipeline import FaceIDPipeline

        analyzer = FaceAnalyzer.from_pretrained(cfg.face_models or None)
        pipeline = FaceIDPipeline(
            self.pipe, self.adapter, face_analyzer=analyzer, image_encoder=self.image_encoder, shortcut=self.shortcut
        )
        self.model.eval()
        similarities, images = [], []
        try:
            for face_path in cfg.validation_faces:
                face = analyzer.get(face_path)
                result = pipeline(
                    cfg.validation_prompts,
                    face,
                    seed=cfg.seed,
                    num_inference_steps=cfg.validation_inference_steps,
                    width=cfg.resolution,
                    height=cfg.resolution,
                )
                for image in result.images:
                    found = analyzer.analyze(image)
                    similarities.append(float(found[0].embedding @ face.embedding) if found else 0.0)
                    images.append(image)
        finally:
            self.model.train()
        sheet = contact_sheet(images, labels=[f"{s:.2f}" for s in similarities])
        folder = Path(cfg.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        sheet.save(folder / f"step-{step:06d}.png")
        for tracker in acc.trackers if cfg.report_to != "none" else []:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        return {
            "validation/identity_similarity": sum(similarities) / len(similarities),
            "validation/face_detected": sum(s != 0.0 for s in similarities) / len(similarities),
        }

    def export(self) -> dict[str, Path]:
        """The trained adapter in the official layouts (+ the separate LoRA file) in the output folder."""
        acc, out = self.accelerator, Path(self.config.output_dir)
        acc.wait_for_everyone()
        written = {}
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            state = self.adapter.state_dict()
            for suffix in (".bin", ".safetensors"):
                written[suffix] = save_state_dict(state, out / f"{self.export_name}{suffix}")
            if self.adapter.spec.lora_rank:
                from .lora import save_lora

                written["lora"] = save_lora(self.adapter, out / f"{self.export_name}_lora.safetensors")
            atomic_write(out / "train_history.json", json.dumps(self.history))
            from .outputs import plot_training

            plot_training(self.history, out / "training.png")
        acc.wait_for_everyone()
        return written

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Inside the block, SIGTERM (schedulers, preemption) and Ctrl-C finish the current step, save, then
        stop; the handlers that were there before are put back when the block ends."""

        def request_stop(signum, frame):
            if self._stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.warning("stop requested (signal %s): saving a checkpoint after this step", signum)

        previous = {}
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, request_stop)
        except ValueError:  # not the main thread (e.g. notebooks): no handlers
            pass
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = Path(output_dir)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _collate(items: list[dict]) -> dict:
    batch = {"caption": [item["caption"] for item in items]}
    for key in items[0]:
        if key != "caption":
            batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    return batch


def train(config: TrainConfig) -> dict[str, Any]:
    return Trainer(config).train()

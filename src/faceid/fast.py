"""Few-step generation: the samplers and the published few-step LoRAs, and how a call uses them.

A few-step preset (``GenerationSettings.fast``) is a distillation LoRA for the base model's family plus
the scheduler, step count and guidance its authors publish:

==========  ==============================  =========================  =====  ========
preset      LoRA (SD1.5 / SDXL)             scheduler                  steps  guidance
==========  ==============================  =========================  =====  ========
lcm         latent-consistency/lcm-lora-*   LCM                        4      1 (off)
tcd         h1t/TCD-*-LoRA                  TCD, eta 0.3               4      1 (off)
hyper       ByteDance/Hyper-SD 4-step       DDIM, trailing spacing     4      1 (off)
lightning   ByteDance/SDXL-Lightning 4-step Euler, trailing spacing    4      1 (off)
==========  ==============================  =========================  =====  ========

Guidance is off (1) in every preset: the LoRAs were distilled to work without classifier-free guidance
(IP-Adapter issue #144 shows what LCM makes at 7.5), and diffusers then runs the UNet on the conditional
half only, one pass per step. A step count, guidance or scheduler given in the settings wins over the
preset's. The identity scale and identity-LoRA weight stay the adapter's: no published few-step setup
for FaceID changes them (the PuLID paper's Lightning comparison and FastFace's Hyper-SD setup use the
adapter as released).

A distilled full UNet (an SDXL-Lightning UNet, DMD2, a Turbo model) needs no LoRA: load it as the base
model and name its sampler with ``scheduler`` (e.g. ``euler-trailing``), its steps and guidance.

The LoRA files are pinned by sha256 (the Git LFS oid) and, where we know it, by commit; they load
through :class:`faceid.lora.LoraStack` as a LoRA named ``fast-<preset>`` the first time a call asks for
the preset, and stay loaded but switched out of the UNet (no effect and no cost) between the calls that use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import FaceIDError
from .hub import HubFile

# name -> (diffusers scheduler class, config overrides): what ``GenerationSettings.scheduler`` can name.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++-trailing": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# Schedulers whose step takes ``eta`` (stochasticity); other schedulers refuse a setting of it.
ETA_SCHEDULERS = ("DDIMScheduler", "TCDScheduler")


@dataclass(frozen=True)
class FastPreset:
    name: str
    title: str
    loras: dict[str, HubFile]  # family -> the distillation LoRA for it
    scheduler: str  # a key of SCHEDULERS
    steps: int = 4
    guidance_scale: float = 1.0
    eta: float | None = None

    def lora(self, family: str) -> HubFile:
        try:
            return self.loras[family]
        except KeyError:
            others = [p.name for p in PRESETS.values() if family in p.loras]
            raise FaceIDError(
                f"--fast {self.name} ({self.title}) exists for {', '.join(self.loras)} only, not {family}: "
                f"use {' or '.join(others)} on {family}"
            ) from None

    def settings_defaults(self, family: str) -> dict[str, Any]:
        """What the preset sets when the settings leave it open (``GenerationSettings.resolve``)."""
        self.lora(family)  # a preset for another family is refused here, before anything loads
        values: dict[str, Any] = {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
        }
        if self.eta is not None:
            values["eta"] = self.eta
        return values


PRESETS: dict[str, FastPreset] = {
    p.name: p
    for p in (
        FastPreset(
            "lcm",
            "LCM-LoRA",
            {
                # sha256 and sizes: the Git LFS pointers of the files at these commits.
                "SD1.5": HubFile(
                    "latent-consistency/lcm-lora-sdv1-5",
                    "pytorch_lora_weights.safetensors",
                    "cf2fced511dbe7e26c8d1d397e728fbab875db4b",
                    "8f90d840e075ff588a58e22c6586e2ae9a6f7922996ee6649a7f01072333afe4",
                    134621556,
                ),
                "SDXL": HubFile(
                    "latent-consistency/lcm-lora-sdxl",
                    "pytorch_lora_weights.safetensors",
                    "a18548dd4956b174ec5b0d78d340c8dae0a129cd",
                    "a764e6859b6e04047cd761c08ff0cee96413a8e004c9f07707530cd776b19141",
                ),
            },
            scheduler="lcm",
        ),
        FastPreset(
            "tcd",
            "Trajectory Consistency Distillation",
            {
                "SD1.5": HubFile(
                    "h1t/TCD-SD15-LoRA",
                    "pytorch_lora_weights.safetensors",
                    None,
                    "eaecb24a1cda4411eab67275b1d991071216ac93693e8fa0c9226c9df0386232",
                ),
                "SDXL": HubFile(
                    "h1t/TCD-SDXL-LoRA",
                    "pytorch_lora_weights.safetensors",
                    None,
                    "2c777bc60abf41d3eb0fe405d23d73c280a020eea5adf97a82a141592c33feba",
                ),
            },
            scheduler="tcd",
            eta=0.3,  # the TCD authors' choice for 4 steps (more steps: lower)
        ),
        FastPreset(
            "hyper",
            "Hyper-SD",
            {
                "SD1.5": HubFile(
                    "ByteDance/Hyper-SD",
                    "Hyper-SD15-4steps-lora.safetensors",
                    None,
                    "c5dd058616461ed5053e2b14eec4dbe3fa0eea3b13688642f6d6c80ea2ba5958",
                ),
                "SDXL": HubFile(
                    "ByteDance/Hyper-SD",
                    "Hyper-SDXL-4steps-lora.safetensors",
                    None,
                    "12f81a27d00a751a40d68fd15597091896c5a90f3bd632fb6c475607cbdad76e",
                    787359648,
                ),
            },
            scheduler="ddim-trailing",  # the Hyper-SD authors' diffusers setup for their 2/4/8-step LoRAs
        ),
        FastPreset(
            "lightning",
            "SDXL-Lightning",
            {
                "SDXL": HubFile(
                    "ByteDance/SDXL-Lightning",
                    "sdxl_lightning_4step_lora.safetensors",
                    "c9a24f48e1c025556787b0c58dd67a091ece2e44",
                    "bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79",
                    393854592,
                ),
            },
            scheduler="euler-trailing",
        ),
    )
}


def preset(name: str) -> FastPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise FaceIDError(f"unknown few-step preset {name!r}: {', '.join(PRESETS)}") from None


def make_scheduler(name: str, base_config: Any):
    """A fresh scheduler ``name`` (a key of ``SCHEDULERS``) on the base model's noise schedule."""
    import diffusers

    try:
        class_name, overrides = SCHEDULERS[name]
    except KeyError:
        raise FaceIDError(f"unknown scheduler {name!r}: {', '.join(SCHEDULERS)}") from None
    return getattr(diffusers, class_name).from_config(base_config, **overrides)

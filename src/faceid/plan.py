"""The plan of one call: every decision a generation makes before it runs, as data.

``request`` reads a call's arguments into the settings asked for (checked before anything is encoded);
``plan_call`` resolves them against the loaded models and the call's conditioning into a ``CallPlan``: the
settings with every default filled in, which diffusers pipeline runs, where each step that runs sits in the
full schedule, in which of those steps the identity, each reference and each ControlNet act, which LoRA
weights the UNet must hold, and how the batch may be split. Both only read: nothing is loaded, switched or
created on a shared object. ``faceid.sampling`` runs a plan on objects that belong to the call alone.

Step positions: a call of N steps at img2img or inpainting strength s runs the last ``min(int(N*s), N)`` of
the N steps of the full schedule (diffusers' ``get_timesteps``), so step i of the run is at position
``(N - run + i) / N``. Windows (``identity_window``, a reference's, a ControlNet's) are fractions of the full
schedule and are matched against these positions: at strength 0.5 of 10 steps the run covers 0.5-0.9, so a
window (0.5, 1) acts in every step that runs and (0, 0.5) in none. In text to image the run is the whole
schedule and position i/N.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .conditioning import Conditioning
from .errors import FaceIDError
from .fast import ETA_SCHEDULERS, SCHEDULERS
from .methods import check_method, refuse_unwired
from .modes import DEFAULT_STRENGTH, ModeInputs, check_controlnet, check_placement, size_from_image
from .settings import ENCODE_FIELDS, GenerationSettings

if TYPE_CHECKING:
    from .model_set import ModelSet

Window = tuple[float, float]

# Arguments faceid gives the diffusers pipeline itself, from the settings, the conditioning or the mode's inputs.
OWN_ARGUMENTS = frozenset(
    {"prompt", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
     "num_images_per_prompt", "generator", "latents", "output_type", "image", "mask_image", "control_image",
     "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"}
)  # fmt: skip


@dataclass(frozen=True)
class StepSchedule:
    """Which steps of the full schedule of ``steps`` a call runs: all but the first ``skipped``."""

    steps: int
    skipped: int = 0

    @classmethod
    def cut(cls, steps: int, strength: float | None, family: str | None = None) -> StepSchedule:
        """The schedule that strength ``strength`` of ``steps`` runs, as diffusers' img2img and inpainting
        pipelines cut it (None: text to image, every step); ``family``: that family's pipelines' rule
        (``BaseFamily.steps_run``; FLUX.1 rounds differently), default Stable Diffusion's."""
        if strength is None:
            return cls(steps)
        if family is not None:
            from .families import family as family_row

            running = family_row(family).steps_run(steps, strength)
        else:
            running = min(int(steps * strength), steps)
        return cls(steps, max(steps - running, 0))

    @property
    def running(self) -> int:
        return self.steps - self.skipped

    @property
    def positions(self) -> tuple[float, ...]:
        """Each step that runs, as its place in the full schedule (a fraction in [0, 1))."""
        return tuple((self.skipped + i) / self.steps for i in range(self.running))

    def inside(self, window: Window | None) -> tuple[bool, ...]:
        """For each step that runs: whether its position is in ``window`` (start <= position < end)."""
        if window is None:
            return (True,) * self.running
        start, end = window
        return tuple(start <= position < end for position in self.positions)

    def controlnet_window(self, window: Window) -> Window | None:
        """diffusers' ``control_guidance_start/end`` over the steps that run that make a ControlNet act in the
        steps it acts in on the full schedule, by diffusers' own rule (step j of N acts when j/N >= start and
        (j+1)/N <= end); None when that is no step. In text to image this is the window's own set of steps."""
        start, end = window
        acting = [
            i
            for i in range(self.running)
            if (self.skipped + i) / self.steps >= start and (self.skipped + i + 1) / self.steps <= end
        ]
        if not acting:
            return None
        return acting[0] / self.running, (acting[-1] + 1) / self.running


@dataclass(frozen=True)
class CallPlan:
    """Everything a call decided before it runs (see the module); ``faceid.sampling.run_plan`` runs it."""

    settings: GenerationSettings  # every default resolved: what the images record
    pipeline: str | None  # the diffusers pipeline class that runs it (None: the loaded text-to-image one)
    images: int
    guidance: bool  # classifier-free guidance: an unconditional half in the UNet batch
    schedule: StepSchedule
    identity_scale: float  # the weight of the identity tokens (0: the adapter is switched off)
    identity_open: tuple[bool, ...]  # for each step that runs: whether the identity acts
    identity_lora: tuple[float, ...]  # the identity LoRA's weight at each step that runs (empty: it has none)
    fast_lora: str | None  # the few-step preset's LoRA that acts in this call (its adapter name)
    reference_open: tuple[tuple[bool, ...], ...]  # each style reference: whether it acts, step by step
    control_windows: tuple[Window | None, ...]  # each ControlNet: diffusers' window over the run (None: no step)
    separable: bool  # one seed per image: the batch may run in parts, each image as in the whole batch
    batch_limit: int | None  # the most images per UNet batch (None: the whole batch at once)
    weights: Hashable | None  # the LoRA weights the UNet must hold (None: the user's settings)
    method: str = "faceid"  # the identity method (faceid.methods) whose tokens the call's identity groups hold
    # InstantID: IdentityNet's conditioning scale and its window over the run (diffusers' control_guidance_start/
    # end; the identity window placed on the full schedule; None: it acts in no step that runs).
    identitynet_scale: float | None = None
    identitynet_window: Window | None = None
    # InfiniteYou: InfuseNet's conditioning scale (the call's ``scale``) and its window over the run, as IdentityNet's.
    infusenet_scale: float | None = None
    infusenet_window: Window | None = None
    # PuLID-FLUX: the authors' true CFG scale where above 1 (a negative pass each step), else None; and for each step
    # that runs, whether its negative pass runs (from the settings' true_cfg_start on; empty without true CFG).
    true_cfg: float | None = None
    true_cfg_open: tuple[bool, ...] = ()

    @property
    def weights_change(self) -> bool:
        """Whether the UNet's LoRA weights change between the steps of the call (then it runs alone)."""
        return len(set(self.identity_lora)) > 1

    def part(self, indices: Sequence[int], conditioning: Conditioning) -> CallPlan:
        """The plan of images ``indices`` alone (a batch run in parts): their prompts and seeds, one image each."""
        from dataclasses import replace

        settings = self.settings.replace(
            prompt=conditioning.prompts,
            negative_prompt=conditioning.negative_prompts,
            num_images_per_prompt=1,
            seed=[self.settings.seed[i] for i in indices],
        )
        return replace(self, settings=settings, images=len(indices), separable=False, batch_limit=None)


def request(
    models: ModelSet,
    prompt: str | Sequence[str] | None,
    settings: GenerationSettings | Mapping[str, Any] | None,
    arguments: Mapping[str, Any],
    inputs: ModeInputs,
    latents_given: bool,
) -> tuple[GenerationSettings, dict[str, Any]]:
    """A call's settings as asked for (keyword arguments win over ``settings``) and its other keyword arguments,
    for the diffusers pipeline; everything that can be refused before encoding is refused here."""
    fields = GenerationSettings.model_fields
    diffusers_kwargs = {k: v for k, v in arguments.items() if k not in fields}
    for k, item in enumerate(inputs.controls):
        check_controlnet(item.controlnet, models.denoiser, models.family, f"control[{k}]")
        if models.offload is None:  # offloaded models wait on the CPU and run where the hooks move them
            check_placement(item.controlnet, models.denoiser, f"control[{k}]")
    overrides = {k: v for k, v in arguments.items() if k in fields}
    if prompt is not None:
        overrides["prompt"] = list(prompt) if isinstance(prompt, tuple) else prompt
    requested = models.with_default_method(GenerationSettings.parse(settings, **overrides))
    check_flux_controlnets(models, inputs, requested.method)
    if requested.method == "faceid" and models.adapter is None:
        raise FaceIDError(
            f"this {models.family} model set has no FaceID adapter (the FaceID adapters are made for SD1.5 and SDXL): "
            f"its identity method is {models.default_method}; leave method out or name a loaded one "
            f"({', '.join(models.methods) or 'none'})"
        )
    # The identity method: one for this base model, its face models at hand, one generation runs, loaded here.
    method = check_method(requested.method, models.family, models.face_models, models.face_packs_at_hand())
    refuse_unwired(method)
    check_method_settings(models, requested, inputs)
    check_family_settings(models, requested)
    target = pipeline_class(
        models, inputs.class_name(models.family, identitynet=requested.method in METHOD_CONTROLNETS)
    )
    check_diffusers_kwargs(diffusers_kwargs, target)
    models.check_models(requested)  # before encoding: a request for other models fails at once
    if inputs.mode is None and requested.strength is not None:
        raise FaceIDError("strength applies to img2img and inpainting: give init_image (--init-image) or leave it out")
    if inputs.mode is not None and requested.strength is None:
        requested = requested.replace(strength=DEFAULT_STRENGTH[inputs.mode])
    if inputs.size() is not None:  # the output size: what is given, the rest from the image
        width, height = size_from_image(requested.width, requested.height, inputs.size())
        requested = requested.replace(width=width, height=height)
    if latents_given and "latents" not in inspect.signature(target.__call__).parameters:
        raise FaceIDError(f"latents= does not apply to {target.__name__}: the init image gives them; leave it out")
    return requested, diffusers_kwargs


def check_flux_controlnets(models: ModelSet, inputs: ModeInputs, method: str) -> None:
    """The FLUX ControlNets of a call, checked together (``modes.check_flux_controlnet_layouts``: several nets without
    InfuseNet must share depth and kind; beside InfiniteYou's InfuseNet, whose ``InfuseNetCall`` sums per block,
    no XLabs-style net)."""
    from .families import family
    from .modes import check_flux_controlnet_layouts, flux_controlnet_layout

    if not inputs.controls or family(models.family).denoiser != "transformer":
        return
    layouts = [flux_controlnet_layout(c.controlnet.config) for c in inputs.controls]
    check_flux_controlnet_layouts(layouts, beside_infusenet=method == "infiniteyou")


# The identity methods that bring a ControlNet of their own (InstantID's IdentityNet, InfiniteYou's InfuseNet):
# their calls run the family's ControlNet pipeline.
METHOD_CONTROLNETS = frozenset({"instantid", "infiniteyou"})


def check_family_settings(models: ModelSet, requested: GenerationSettings) -> None:
    """Settings a family does not run are refused: with FLUX.1's embedded guidance, a negative prompt (it has no
    unconditional pass), and the Stable Diffusion samplers and few-step presets."""
    from .families import family

    if not family(models.family).guidance_embedded:
        return
    # PuLID-FLUX's true CFG runs a negative pass: there a negative prompt applies
    true_cfg = requested.method == "pulid-flux" and (requested.true_cfg or 1.0) > 1
    given = {
        # "" for every prompt is none (a server's batch of jobs gives one per prompt)
        "negative_prompt": not true_cfg
        and any(
            [requested.negative_prompt]
            if isinstance(requested.negative_prompt, str)
            else requested.negative_prompt or ()
        ),  # fmt: skip
        "scheduler": requested.scheduler is not None,
        "fast": requested.fast is not None,
        "eta": requested.eta is not None,
    }
    refused = [name for name, set_ in given.items() if set_]
    if refused:
        raise FaceIDError(
            f"{', '.join(refused)} do(es) not apply to {models.family}: its guidance is embedded in the transformer "
            "(no negative prompt, but with PuLID-FLUX's true_cfg above 1) and it samples with its own flow-matching "
            "scheduler; leave "
            f"{'it' if len(refused) == 1 else 'them'} out"
        )


def check_method_settings(models: ModelSet, requested: GenerationSettings, inputs: ModeInputs) -> None:
    """Settings and inputs that belong to one identity method are refused with another; a method beside FaceID
    must be loaded (``ModelSet.load_method``)."""
    method = requested.method
    if method != "pulid-flux" and requested.true_cfg is not None:
        raise FaceIDError(f"true_cfg is PuLID-FLUX's true CFG scale, not {method}'s: leave it out")
    if method != "pulid-flux" and requested.true_cfg_start is not None:
        raise FaceIDError(f"true_cfg_start is PuLID-FLUX's true CFG start step, not {method}'s: leave it out")
    pulid_only = [name for name in ("pulid_num_zero", "pulid_ortho") if getattr(requested, name) is not None]
    if method != "pulid" and pulid_only:
        raise FaceIDError(
            f"{' and '.join(pulid_only)} belong(s) to PuLID v1.1 (SDXL), not {method}: give method='pulid' with "
            f"{'it' if len(pulid_only) == 1 else 'them'}, or leave {'it' if len(pulid_only) == 1 else 'them'} out"
        )
    if method == "faceid":
        if requested.identitynet_scale is not None:
            raise FaceIDError("identitynet_scale is InstantID's IdentityNet scale: give method='instantid' with it")
        if inputs.kps is not None:
            raise FaceIDError(
                "kps= (--kps) is the photo whose face keypoints InstantID follows: give method='instantid'"
            )
        return
    models.loaded_method(method)  # loaded, or the error that says how
    if method != "instantid" and requested.identitynet_scale is not None:
        raise FaceIDError(f"identitynet_scale is InstantID's IdentityNet scale, not {method}'s: leave it out")
    faceid_only = {
        "combine": requested.combine is not None,
        "shortcut": requested.shortcut is not None,
        "regions": requested.regions is not None,
        "identity_guidance": requested.identity_guidance > 0,
        "lora_scale": requested.lora_scale is not None,
    }
    given = [name for name, set_ in faceid_only.items() if set_]
    if given:
        raise FaceIDError(
            f"{', '.join(given)} belong(s) to FaceID's adapter and do(es) nothing with method {method}: leave "
            f"{'it' if len(given) == 1 else 'them'} out, or use method faceid"
        )


def plan_call(
    models: ModelSet,
    requested: GenerationSettings,
    conditioning: Conditioning,
    inputs: ModeInputs,
    *,
    noise_given: bool = False,
    max_batch: int | None = None,
) -> CallPlan:
    """The plan of a call of ``requested`` on ``conditioning`` (see the module). ``noise_given``: the call brings
    its own generator or latents (then the batch draws its noise as one and runs whole)."""
    run = models.resolve_settings(requested.replace(**conditioning.settings.model_dump(include=set(ENCODE_FIELDS))))
    images = len(conditioning.prompts) * conditioning.num_images_per_prompt
    if run.seed is None and not noise_given:
        run = run.replace(seed=[random.randrange(2**31) for _ in range(images)])  # every image reproducible
    if isinstance(run.seed, list) and len(run.seed) != images:
        raise FaceIDError(f"{len(run.seed)} seeds for {images} images: give one seed per image, or one int")
    if max_batch is not None and max_batch < 1:
        raise FaceIDError(f"max_batch must be at least 1, got {max_batch}")
    if run.strength is not None and int(run.num_inference_steps * run.strength) < 1:
        raise FaceIDError(
            f"strength {run.strength} of {run.num_inference_steps} steps runs no step: raise strength or steps"
        )
    check_eta(models, run)
    # As diffusers decides it: guidance above 1 on a UNet without a distilled guidance embedding (none for a family
    # whose guidance is the transformer's input: FLUX.1).
    from .families import family as family_row

    embedded = family_row(models.family).guidance_embedded
    guidance = (
        not embedded and run.guidance_scale > 1 and getattr(models.denoiser.config, "time_cond_proj_dim", None) is None
    )
    schedule = StepSchedule.cut(run.num_inference_steps, run.strength, models.family)
    adapter = models.adapter
    identity_open = schedule.inside(run.identity_window)
    identity_lora: tuple[float, ...] = ()
    faceid = run.method == "faceid"
    if adapter is None:
        pass  # no FaceID adapter, no identity LoRA (FLUX.1)
    elif adapter.has_lora and not faceid:  # FaceID's LoRA belongs to its tokens: off in another method's call
        identity_lora = (0.0,) * schedule.running
        if adapter.lora_fused and adapter.lora_weight() != 0.0:
            raise FaceIDError(
                f"the FaceID adapter's identity LoRA is fused into the UNet, and a {run.method} call runs without it: "
                "unfuse_lora() first (CLI: leave out --fuse-lora and --compile)"
            )
    elif adapter.has_lora:
        identity_lora = tuple(adapter.lora_weight(run.lora_scale, acting) for acting in identity_open)
        if adapter.lora_fused and set(identity_lora) != {adapter.lora_weight()}:
            raise FaceIDError(
                "the identity LoRA is fused into the UNet, so its weight is fixed at "
                f"{adapter.lora_weight()}: this call asks for {sorted(set(identity_lora))} "
                "(an identity window, lora_scale or the adapter switched off); unfuse_lora() first, or leave them out"
            )
    fast_lora = f"fast-{run.fast}" if run.fast else None
    weights = None
    if (adapter is not None and set(identity_lora) - {adapter.lora_weight()}) or fast_lora is not None:
        weights = (identity_lora, fast_lora)
    controls = tuple(schedule.controlnet_window(c.window) for c in inputs.controls)
    separable = isinstance(run.seed, list) and not noise_given
    limit = max_batch if max_batch is not None else max_batch_size(models, run, guidance)
    identitynet = run.method == "instantid"
    infusenet = run.method == "infiniteyou"
    true_cfg = float(run.true_cfg) if run.method == "pulid-flux" and (run.true_cfg or 1.0) > 1 else None
    # The authors' timestep_to_start_cfg counts the steps of their (text to image) loop: here the full schedule's,
    # as every step setting, so img2img's first steps that run are the full schedule's steps past the cut.
    start = run.true_cfg_start or 0
    true_cfg_open = tuple(schedule.skipped + i >= start for i in range(schedule.running)) if true_cfg else ()
    return CallPlan(
        settings=run,
        pipeline=inputs.class_name(models.family, identitynet=run.method in METHOD_CONTROLNETS),
        images=images,
        guidance=guidance,
        schedule=schedule,
        # FaceID's switch (set_active) is the FaceID adapter's; another method's scale is the call's alone.
        identity_scale=float(run.scale) if not faceid or adapter.active else 0.0,
        identity_open=identity_open,
        identity_lora=identity_lora,
        fast_lora=fast_lora,
        reference_open=tuple(schedule.inside(r.window) for r in conditioning.references),
        control_windows=controls,
        separable=separable,
        batch_limit=limit if separable and limit is not None and images > limit else None,
        weights=weights,
        method=run.method,
        identitynet_scale=float(run.identitynet_scale) if identitynet else None,
        identitynet_window=schedule.controlnet_window(run.identity_window or (0.0, 1.0)) if identitynet else None,
        infusenet_scale=float(run.scale) if infusenet else None,
        infusenet_window=schedule.controlnet_window(run.identity_window or (0.0, 1.0)) if infusenet else None,
        true_cfg=true_cfg,
        true_cfg_open=true_cfg_open,
    )


def check_same_encoding(requested: GenerationSettings, encoded: GenerationSettings) -> None:
    """With ``conditioning=``, an encode-time setting given again must be the one it was encoded with."""
    for key in requested.model_fields_set & set(ENCODE_FIELDS):
        if getattr(requested, key) != getattr(encoded, key):
            raise FaceIDError(
                f"{key}={getattr(requested, key)!r} differs from the conditioning's {getattr(encoded, key)!r}: "
                "encode() again with the new value"
            )


def pipeline_class(models: ModelSet, class_name: str | None) -> type:
    """The class of the diffusers pipeline that runs a call (the loaded pipeline's for text to image)."""
    if class_name is None:
        return type(models.pipe)
    import diffusers

    return getattr(diffusers, class_name)


def check_diffusers_kwargs(kwargs: Mapping[str, Any], target: type) -> None:
    """Refuse an argument that is neither a generation setting nor one the diffusers pipeline ``target`` takes
    (diffusers would swallow it into ``**kwargs`` and ignore it)."""
    accepted = set(inspect.signature(target.__call__).parameters)
    unknown = sorted(k for k in kwargs if k not in accepted or k in OWN_ARGUMENTS)
    if unknown:
        raise FaceIDError(
            f"unknown argument(s) {', '.join(unknown)}: not a generation setting "
            f"({', '.join(GenerationSettings.model_fields)}) nor an argument of {target.__name__} "
            "(images: init_image=, mask_image=, control=ControlInput(...))"
        )


def check_eta(models: ModelSet, run: GenerationSettings) -> None:
    """Refuse ``eta`` for a sampler that would silently ignore it."""
    used = SCHEDULERS[run.scheduler][0] if run.scheduler is not None else type(models.pipe.scheduler).__name__
    if run.eta is not None and used not in ETA_SCHEDULERS:
        raise FaceIDError(f"eta applies to the DDIM and TCD samplers only, not {used}: leave it out")


def max_batch_size(models: ModelSet, run: GenerationSettings, classifier_free_guidance: bool) -> int | None:
    """How many images of ``run``'s size fit in one UNet batch in the device's free memory; None when no limit
    is known (CPU, MPS: the batch runs whole).

    A rough estimate (what a UNet pass keeps alive per image, about 60 activations of its first block's width
    at the latent size, twice under guidance; the VAE decodes one image at a time then), capped at 64. A batch
    that still runs out of memory is retried in halves (``faceid.batching``).
    """
    if models.device.type != "cuda" or models.adapter is None:  # no estimate for a DiT yet: the batch runs whole
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(models.device)
    unet = models.pipe.unet
    scale = models.pipe.vae_scale_factor
    latent_pixels = (run.width // scale) * (run.height // scale)
    per_image = 60 * unet.config.block_out_channels[0] * latent_pixels * unet.dtype.itemsize
    per_image *= 2 if classifier_free_guidance else 1
    return max(1, min(64, int(0.7 * free // per_image)))

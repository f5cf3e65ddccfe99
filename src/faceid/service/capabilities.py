"""What this server can run, stated at start, and the one check that refuses the rest at submit.

A server runs only what it was started with (``faceid serve``'s flags, ``ServeConfig``): the few-step presets whose
LoRA it loaded (``--fast PRESET[=FILE]``), the tiny VAE decoder (``--tiny-vae``), the ControlNet kinds
(``--controlnet KIND=SOURCE``, one per kind and family: each model set runs its family's) with the annotators they
need (OpenPose for ``pose``, the depth model for ``depth``), the style adapters (``--style-adapter NAME=SOURCE``), the identity methods beside FaceID (``--method-weights
NAME=FOLDER``, on the model sets of their families) and, on workers that run them, the modes beyond text-to-image. Every model these need is loaded by each worker when it loads a model set, counted in its memory
budget; a request that asks for anything else is refused at submit (``Capabilities.check``, 422), saying what the
server has: no request value ever starts a download. ``GET /v1/models`` lists them (``Capabilities.describe``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FaceIDError
from ..settings import GenerationSettings
from .inputs import MAX_PEOPLE, TEXT_TO_IMAGE, JobInputs

# What a generation can do, the web app's mode menu: the JobInputs modes a request asks for by its fields.
MODES = (TEXT_TO_IMAGE, "img2img", "inpaint", "controlnet", "swap")
# The models ``faceid.control.make_control_image`` needs beyond the ControlNet, by control kind: loaded with the
# server's ControlNet of that kind (``faceid.control.annotator_options``).
ANNOTATORS = {"pose": "openpose", "depth": "depth"}
# The identity methods whose ControlNet follows the face of a keypoint photo (``kps``): IdentityNet, InfuseNet.
KPS_METHODS = ("instantid", "infiniteyou")


class NotServed(FaceIDError):
    """A request asks for something this server was not started with (422 ``invalid_request``)."""


@dataclass(frozen=True)
class Capabilities:
    """What this server runs: built once at start (``Capabilities.of``) from its configuration and its workers."""

    fast: tuple[str, ...] = ()  # few-step presets (faceid.fast.PRESETS) whose LoRA every worker loaded
    decoders: tuple[str, ...] = ("full",)  # GenerationSettings.decoder values: "tiny" with a tiny VAE
    controlnets: tuple[str, ...] = ()  # control kinds
    # the control kinds each family's model sets run (the ControlNets made for it): family -> kinds
    family_controlnets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # the layout of each FLUX ControlNet by kind (``modes.flux_controlnet_layout``: blocks, XLabs-style or not), read
    # from its config at start, so that nets that cannot run together are refused at submit: kind -> layout
    flux_controlnet_layouts: Mapping[str, tuple[int, int, bool]] = field(default_factory=dict)
    style_adapters: tuple[str, ...] = ()  # names
    annotators: tuple[str, ...] = ()  # the control kinds' annotator models (ANNOTATORS)
    modes: tuple[str, ...] = (TEXT_TO_IMAGE,)
    max_people: int = 1
    methods: tuple[str, ...] = ("faceid",)  # identity methods whose weights every worker loads

    @classmethod
    def of(cls, config: Any, tiny_vae: bool) -> Capabilities:
        """From ``config`` (a ``ServeConfig``; every worker, on one machine or a Ray replica, runs every mode with what
        it configures); ``tiny_vae``: whether the models were loaded with a tiny VAE."""
        from ..families import family as family_row
        from ..modes import controlnet_config, flux_controlnet_layout

        kinds = tuple(config.controlnets)
        by_family: dict[str, tuple[str, ...]] = {}
        layouts: dict[str, tuple[int, int, bool]] = {}
        for kind, nets in config.controlnets.items():  # {kind: {family: source}} (``config.check_controlnets``)
            for family, source in nets.items():
                by_family[family] = (*by_family.get(family, ()), kind)
                if family_row(family).denoiser == "transformer":  # (one FLUX family: its nets by kind)
                    layouts[kind] = flux_controlnet_layout(controlnet_config(source))
        return cls(
            fast=tuple(config.fast),
            decoders=("full", "tiny") if tiny_vae else ("full",),
            controlnets=kinds,
            family_controlnets=by_family,
            flux_controlnet_layouts=layouts,
            style_adapters=tuple(config.style_adapters),
            annotators=tuple(dict.fromkeys(ANNOTATORS[kind] for kind in kinds if kind in ANNOTATORS)),
            modes=MODES,
            max_people=MAX_PEOPLE,
            methods=("faceid", *getattr(config, "methods", {})),
        )

    def check(self, settings: GenerationSettings, inputs: JobInputs) -> None:
        """Refuse (``NotServed``) what a request asks for that this server was not started with, saying what it has
        and how to get the rest."""
        from ..methods import METHODS

        if not METHODS[settings.method].wired:  # never run as FaceID: refused at submit, as the pipeline would
            runs = [m.name for m in METHODS.values() if m.wired]
            raise NotServed(
                f"method: {settings.method!r} is not wired into generation yet; this server runs {_listed(runs)}"
            )
        if settings.method not in self.methods:  # wired, but its weights are not loaded here
            raise NotServed(
                f"method: this server has no {settings.method!r} weights loaded; it runs {_listed(self.methods)} "
                f"(restart it with --method-weights {settings.method}=FOLDER to add it)"
            )
        others = {  # settings of one method given with another: the pipeline would refuse them when the job runs
            "identitynet_scale (InstantID's)": settings.method != "instantid"
            and settings.identitynet_scale is not None,
            "true_cfg (PuLID-FLUX's)": settings.method != "pulid-flux" and settings.true_cfg is not None,
            "true_cfg_start (PuLID-FLUX's)": settings.method != "pulid-flux" and settings.true_cfg_start is not None,
            "pulid_num_zero (PuLID's)": settings.method != "pulid" and settings.pulid_num_zero is not None,
            "pulid_ortho (PuLID's)": settings.method != "pulid" and settings.pulid_ortho is not None,
            "combine (FaceID's)": settings.method != "faceid" and settings.combine is not None,
            "shortcut (FaceID's)": settings.method != "faceid" and settings.shortcut is not None,
            "lora_scale (FaceID's)": settings.method != "faceid" and settings.lora_scale is not None,
            "identity_guidance (FaceID's)": settings.method != "faceid" and settings.identity_guidance > 0,
        }
        given = [name for name, asked in others.items() if asked]
        if given:
            raise FaceIDError(
                f"{', '.join(given)}: not a setting of method {settings.method!r}; leave "
                f"{'it' if len(given) == 1 else 'them'} out, or name the method it belongs to"
            )
        if inputs.kps is not None and settings.method not in KPS_METHODS:
            raise FaceIDError("kps: the keypoint photo is InstantID's and InfiniteYou's (IdentityNet or InfuseNet "
                            "follows its face): give method 'instantid' or 'infiniteyou' with it, or leave kps out")  # fmt: skip
        if settings.fast is not None and settings.fast not in self.fast:
            raise NotServed(
                f"fast: this server has no {settings.fast!r} preset; it has {_listed(self.fast)} (restart it with "
                f"--fast {settings.fast} to add one)"
            )
        if settings.decoder is not None and settings.decoder not in self.decoders:
            raise NotServed(
                f"decoder: this server has no {settings.decoder!r} decoder (no tiny VAE); it has "
                f"{_listed(self.decoders)} (restart it with --tiny-vae to add the tiny one)"
            )
        if settings.tiny_vae is not None and "tiny" not in self.decoders:
            raise NotServed(
                "tiny_vae: this server has no tiny VAE; leave tiny_vae out (restart it with --tiny-vae to add one)"
            )
        for k, reference in enumerate(inputs.style or ()):
            if reference.adapter not in self.style_adapters:
                raise NotServed(
                    f"style[{k}].adapter: this server has no style adapter named {reference.adapter!r} (it has: "
                    f"{_listed(sorted(self.style_adapters))}); use one of those names (GET /v1/models lists them), "
                    "or start the server with --style-adapter NAME=SOURCE"
                )

    def check_model_set(self, settings: GenerationSettings, entry: Any, entries: list) -> None:
        """Refuse a method on a model set of a family it does not run on (``entry``: the request's catalog entry),
        naming the model sets that run it."""
        from ..methods import METHODS

        method = METHODS[settings.method]
        if settings.method == "faceid" or entry.family in method.families:
            return
        runs = [e.label() for e in entries if e.family in method.families]
        raise NotServed(
            f"method: {settings.method} ({method.title}) runs on {' or '.join(method.families)} model sets, and the "
            f"one this request names is {entry.family} ({entry.label()}); name one that runs it: "
            f"{'; '.join(runs) or 'none'} (GET /v1/models lists each model set's methods)"
        )

    def check_family(self, settings: GenerationSettings, inputs: JobInputs, entry: Any) -> None:
        """Refuse (``NotServed``) what the request's model set cannot do, by its family (``entry``: its catalog
        entry): the ControlNets of its family only (``--controlnet``, one per kind and family); a FLUX.1 set has no
        FaceID adapter (so no FaceID call, nor what is FaceID's: several people in one picture, swap, style adapters,
        the few-step LoRAs loaded with the SD sets, the tiny VAE)
        and its guidance is embedded in its transformer (no negative prompt, no SD sampler). Said before the job is
        queued, instead of the job failing when it runs."""
        from ..families import family
        from ..fast import PRESETS

        row = family(entry.family)
        what = f"the model set this request names ({entry.label()})"
        kinds = self.family_controlnets.get(entry.family, ())
        for k, control in enumerate(inputs.controls or ()):
            if control.kind not in kinds:
                elsewhere = [f for f, theirs in self.family_controlnets.items() if control.kind in theirs]
                others = f"; this server's is for {' and '.join(elsewhere)} model sets" if elsewhere else ""
                raise NotServed(
                    f"controls[{k}].kind: {what} has no ControlNet for {control.kind!r} (it has: "
                    f"{_listed(sorted(kinds))}){others}; use one of those kinds, name a model set that has one (GET "
                    f"/v1/models lists each one's controlnets), or start the server with --controlnet "
                    f"{control.kind}=SOURCE, SOURCE a {entry.family} ControlNet"
                )
        if row.denoiser == "transformer" and inputs.controls:
            from ..modes import check_flux_controlnet_layouts

            layouts = [self.flux_controlnet_layouts[control.kind] for control in inputs.controls]
            try:  # the nets the job would run, as its call checks them (before it is queued)
                check_flux_controlnet_layouts(layouts, beside_infusenet=settings.method == "infiniteyou")
            except FaceIDError as exc:
                raise NotServed(f"controls: {str(exc).replace('control[', 'controls[')}") from None
        if settings.fast is not None and entry.family not in PRESETS[settings.fast].loras:
            raise NotServed(
                f"fast: the {settings.fast!r} preset exists for {', '.join(PRESETS[settings.fast].loras)} model sets, "
                f"and {what} is {entry.family}: leave fast out, or name a model set of its family (this server's "
                f"presets: {_listed(self.fast)})"
            )
        if row.faceid_adapters:
            return
        refused = {
            "method 'faceid'": settings.method == "faceid",
            "people (several in one picture)": inputs.people is not None,
            "swap": inputs.swap is not None,
            "style": bool(inputs.style),
            "decoder 'tiny' (no tiny VAE)": settings.decoder == "tiny" or settings.tiny_vae is not None,
        }
        # PuLID-FLUX's true CFG runs a negative pass: there a negative prompt applies
        true_cfg = settings.method == "pulid-flux" and (settings.true_cfg or 1.0) > 1
        if row.guidance_embedded:
            negatives = (
                [settings.negative_prompt] if isinstance(settings.negative_prompt, str) else settings.negative_prompt
            )
            refused.update(
                {
                    "negative_prompt (its guidance is embedded: no unconditional pass; but with PuLID-FLUX's "
                    "true_cfg above 1)": not true_cfg and any(negatives or ()),
                    "scheduler (it samples with its own flow-matching scheduler)": settings.scheduler is not None,
                    "eta": settings.eta is not None,
                }
            )
        given = [name for name, asked in refused.items() if asked]
        if given:
            runs = [m["name"] for m in describe_methods(entry.family, self.methods)]
            raise NotServed(
                f"{'; '.join(given)}: {what} is {entry.family}, which has no FaceID adapter and runs the identity "
                f"method(s) {_listed(runs)} with text-to-image, img2img and inpainting (and its family's ControlNets); leave "
                f"{'it' if len(given) == 1 else 'them'} out, or name a Stable Diffusion model set (GET /v1/models)"
            )

    def describe_fast(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models``'s ``fast``: each loaded preset, the model families it exists for, and what it sets when
        a request leaves it open."""
        from ..fast import PRESETS

        found = {}
        for name in self.fast:
            preset = PRESETS[name]
            found[name] = {
                "title": preset.title,
                "families": list(preset.loras),
                "num_inference_steps": preset.steps,
                "scheduler": preset.scheduler,
                "guidance_scale": preset.guidance_scale,
                **({"eta": preset.eta} if preset.eta is not None else {}),
            }
        return found


def _listed(names) -> str:
    return ", ".join(names) or "none"


def check_methods(methods: Mapping[str, Any]) -> dict[str, str | None]:
    """``ServeConfig.methods``: identity method -> the folder of its released files, each one a method generation
    runs (``faceid.methods.METHODS``, wired) other than faceid, its folder there; None for a method whose files the
    table pins (fetched when the server loads it)."""
    from ..methods import METHODS, identity_method

    found: dict[str, str | None] = {}
    for name, source in dict(methods).items():
        method = identity_method(name)  # an unknown name: the error lists the methods
        if name == "faceid":
            raise FaceIDError("--method-weights faceid=...: faceid is the model set's own adapter (--adapter)")
        if not method.wired:
            wired = [m.name for m in METHODS.values() if m.wired and m.name != "faceid"]
            raise FaceIDError(
                f"--method-weights {name}: {method.title} is not wired into generation yet; a server loads "
                f"{_listed(wired)}"
            )
        if source is None and not method.unpinned:
            found[name] = None  # its released files, fetched at their pinned commits and sha256-checked
            continue
        if not isinstance(source, (str, os.PathLike)) or not str(source).strip() or not Path(source).is_dir():
            raise FaceIDError(
                f"--method-weights {name}={source}: no such folder; give the folder of {method.title}'s released "
                f"files ({', '.join(f.path_in_repo.split('/')[0] for f in method.files_for())} of "
                f"{method.files_for()[0].repo if method.files_for() else 'its authors'})"
            )
        found[name] = str(source)
    return found


def describe_methods(family: str, loaded: tuple[str, ...]) -> list[dict[str, Any]]:
    """``GET /v1/models``' ``methods`` of a model set of ``family``: each loaded identity method that runs on it
    (faceid first), with its title, licences and the defaults it brings (InstantID's identitynet_scale...)."""
    from ..methods import METHODS

    found = []
    for name in loaded:
        method = METHODS[name]
        if family not in method.families:
            continue
        found.append(
            {
                "name": name,
                "title": method.title,
                "licence": method.licence_text(),
                "commercial": method.commercial,
                "face_pack": method.face_pack,
                "defaults": dict(method.defaults),
            }
        )
    return found


def check_fast_presets(fast: Mapping[str, Any]) -> dict[str, str | None]:
    """``ServeConfig.fast``: preset name -> a local copy of its LoRA (None: the pinned Hub file, fetched at start)."""
    from ..fast import PRESETS

    found: dict[str, str | None] = {}
    for name, source in dict(fast).items():
        if name not in PRESETS:
            raise FaceIDError(f"fast: unknown few-step preset {name!r}; the presets are {', '.join(PRESETS)}")
        if source is not None and (not isinstance(source, (str, os.PathLike)) or not str(source).strip()):
            raise FaceIDError(f"fast: give the LoRA file of {name!r} as a path, or None for the pinned Hub file")
        if source is not None and not Path(source).is_file():
            raise FaceIDError(
                f"--fast {name}={source}: no such file; give a local copy of the {name} preset's LoRA, or leave "
                "=FILE out to fetch the pinned Hub file at start"
            )
        found[name] = None if source is None else str(source)
    return found

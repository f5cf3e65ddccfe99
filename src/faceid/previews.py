"""The tiny VAE (TAESD / TAESDXL) and live previews of a generation as it forms.

* ``load_tiny_vae``: diffusers' ``AutoencoderTiny`` from a released name (``taesd`` for SD1.5, ``taesdxl`` for
  SDXL, or ``auto``: the base model family's), downloaded at a pinned Hub commit and refused unless its sha256 is
  the table's; or from a local diffusers folder or ``.safetensors`` file. One made for another family is refused.
* ``decode``: latents -> PIL images through a VAE, the full one or the tiny one (the pipeline's own postprocessing).
* ``live_previews``: the step-end callback of one call that shows the image every ``k`` steps and at the last one.

What tells TAESD and TAESDXL apart: nothing in their configuration. Both repositories hold the same
``AutoencoderTiny`` (``AutoencoderTiny()``'s defaults: 4 latent channels, ``scaling_factor`` 1.0, four 64-channel
blocks, 8x upsampling), trained on the latents each family's UNet works in (SD1.5's, scaled by 0.18215; SDXL's,
by 0.13025); only the weights differ. So the family comes from the name, or from the weights file's sha256 when
it is one of the released files; a file that is neither is taken as it is, after the checks the shapes allow
(latent channels and upsampling factor of the base model's VAE).

Sources of the pinned values: the Git LFS pointers (``oid sha256``, ``size``) of
``diffusion_pytorch_model.safetensors`` at the commits named below, as other projects that pin these files
publish them (e.g. a stable-diffusion.cpp front end's preset table and a model manifest verified by ``-Verify``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, FaceIDError, MissingWeightsError
from .hub import HubFile

logger = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class TinyVAERelease:
    name: str
    family: str  # "SD1.5" or "SDXL"
    file: HubFile


TINY_VAES: dict[str, TinyVAERelease] = {
    r.name: r
    for r in (
        TinyVAERelease(
            "taesd",
            "SD1.5",
            HubFile(
                "madebyollin/taesd",
                WEIGHTS,
                "614f76814bbe30edbe2e627ace1c2234c81a2c0e",
                "db169d69145ec4ff064e49d99c95fa05d3eb04ee453de35824a6d0f325513549",
                9793292,
            ),
        ),
        TinyVAERelease(
            "taesdxl",
            "SDXL",
            HubFile(
                "madebyollin/taesdxl",
                WEIGHTS,
                "b20258aaef75ef61e659c1e0f14f251cf0ad153e",
                "ff4824aca94dd6111e0340fa749347fb74101060d9712cb5ef1ca8f1cf17502f",
                9793292,
            ),
        ),
    )
}
FAMILY_TINY_VAE = {r.family: r.name for r in TINY_VAES.values()}
AUTO = "auto"  # the base model family's released tiny VAE

# Where a scheduler's step output holds its prediction of the clean latents (DDIM, Euler, DDPM...: the first;
# LCM: the second). Schedulers without one (DPM-Solver++, UniPC) are previewed from their current latents.
X0_FIELDS = ("pred_original_sample", "denoised")


def tiny_vae_name(source: str | os.PathLike, family: str) -> str:
    """The released name that ``source`` means (``auto``, a name or its repo id), or ``source`` as given."""
    text = str(source)
    if text == AUTO:
        return FAMILY_TINY_VAE[family]
    by_repo = {r.file.repo: r.name for r in TINY_VAES.values()}
    return by_repo.get(text, text)


def load_tiny_vae(
    source: str | os.PathLike, family: str, base_vae, dtype: torch.dtype, device: torch.device | str
) -> tuple[Any, str]:
    """(the ``AutoencoderTiny``, its source as settings record it) for a pipeline of ``family`` whose full VAE
    is ``base_vae``; ``CheckpointError`` for one made for another family or other latents."""
    from diffusers import AutoencoderTiny

    name = tiny_vae_name(source, family)
    release = TINY_VAES.get(name)
    path = Path(name).expanduser()
    if release is not None:
        _refuse_other_family(name, release.family, family)  # before any download
    elif path.exists():
        known = _released_file_family(path / WEIGHTS if path.is_dir() else path)
        if known is not None:
            _refuse_other_family(str(path), known, family)
    if release is not None:
        from .hub import fetch

        vae = _from_weights(fetch(release.file))
    elif path.is_file():
        vae = _from_weights(path)
    elif path.is_dir():
        try:
            vae = AutoencoderTiny.from_pretrained(str(path))
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a diffusers AutoencoderTiny folder ({type(exc).__name__}: {str(exc)[:200]}); "
                f"give a folder with config.json and {WEIGHTS}, or one of {', '.join(TINY_VAES)}"
            ) from None
    else:
        raise MissingWeightsError(
            f"tiny VAE {name!r} not found: give {', '.join(TINY_VAES)} (or {AUTO!r}: {FAMILY_TINY_VAE[family]} for "
            f"this {family} model), a diffusers AutoencoderTiny folder or its {WEIGHTS}"
        )
    _check_fits(vae, base_vae, name)
    vae = vae.to(device=device)
    if vae.dtype != dtype:  # (only then: diffusers warns about any cast of this model)
        vae = vae.to(dtype=dtype)
    return vae.eval().requires_grad_(False), name


def _from_weights(path: Path):
    """The released architecture (``AutoencoderTiny()``) with the weights of ``path``, every shape checked."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    vae = AutoencoderTiny()
    try:
        vae.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} does not hold TAESD weights in the diffusers layout ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Give {WEIGHTS} of madebyollin/taesd or madebyollin/taesdxl (not "
            f"taesd_decoder.safetensors, which has another layout), or a diffusers AutoencoderTiny folder"
        ) from None
    return vae


def _released_file_family(path: Path) -> str | None:
    """The family of a released tiny VAE file, told by its sha256; None for any other file."""
    from .hub import file_sha256

    if not path.is_file():
        return None
    found = file_sha256(path)
    return next((r.family for r in TINY_VAES.values() if r.file.sha256 == found), None)


def _refuse_other_family(source: str, made_for: str, family: str) -> None:
    if made_for != family:
        raise CheckpointError(
            f"tiny VAE {source} was made for {made_for} latents but this is an {family} model: its images would "
            f"come out wrong. Use {FAMILY_TINY_VAE[family]} (or {AUTO!r})"
        )


def _check_fits(vae, base_vae, source: str) -> None:
    """Refuse a tiny VAE whose latents or image size differ from the full VAE's."""
    channels = vae.config.latent_channels
    wanted = base_vae.config.latent_channels
    if channels != wanted:
        raise CheckpointError(f"tiny VAE {source} decodes {channels}-channel latents; this model's have {wanted}")
    scale = vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)
    base_scale = 2 ** (len(base_vae.config.block_out_channels) - 1)
    if scale != base_scale:
        raise CheckpointError(f"tiny VAE {source} upsamples latents {scale}x; this model's VAE does {base_scale}x")


# ---------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode(pipe, vae, latents: torch.Tensor) -> list:
    """PIL images of ``latents`` (in the UNet's space) through ``vae``, as the diffusers pipeline decodes them.

    A half-precision VAE that needs float32 (``force_upcast``, SDXL's) decodes in float32, put back after.
    """
    config = vae.config
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents)
        std = torch.tensor(std).view(shape).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with _float32(vae) if upcast else contextlib.nullcontext():
        image = vae.decode(latents.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@contextlib.contextmanager
def _float32(vae) -> Iterator[None]:
    vae.to(dtype=torch.float32)
    try:
        yield
    finally:
        vae.to(dtype=torch.float16)


# ---------------------------------------------------------------------------------------------- previews
def check_preview_arguments(every: int | None, on_preview: Callable | None) -> None:
    if every is not None and on_preview is None:
        raise FaceIDError("preview_every needs on_preview, the function that receives the previews")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise FaceIDError(f"preview_every must be a whole number of steps, at least 1; got {every!r}")


@contextlib.contextmanager
def live_previews(
    pipe, vae, every: int | None, on_preview: Callable, pipeline_kwargs: Mapping[str, Any]
) -> Iterator[dict]:
    """The diffusers arguments that call ``on_preview(step, total, images)`` after every ``every``-th step and
    after the last one, in step order: ``step`` counts the steps done (1..total), ``images`` is one PIL image per
    image of the batch, decoded by ``vae``.

    A preview shows the scheduler's prediction of the finished image at that step (its ``pred_original_sample``,
    read from the step's output while the block is open), which shows the picture long before the noisy latents
    do; the last preview is the final latents themselves, so it is exactly what ``decode`` makes of them. A user's
    ``callback_on_step_end`` (in ``pipeline_kwargs``) runs first, and the latents it returns are the ones shown.
    Nothing the sampling computes changes: same seed, same image, with or without previews.
    """
    every = every or 1
    inner = pipeline_kwargs.get("callback_on_step_end")
    seen: dict[str, torch.Tensor | None] = {}

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        out = inner(pipeline, step, timestep, callback_kwargs) if inner else callback_kwargs
        total = pipeline.num_timesteps
        last = step == total - 1
        if (step + 1) % every == 0 or last:
            latents = out.get("latents", callback_kwargs["latents"])
            shown = latents if last or seen.get("x0") is None else seen["x0"]
            on_preview(step + 1, total, decode(pipeline, vae, shown))
        return out

    tensor_inputs = list(pipeline_kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if "latents" not in tensor_inputs:
        tensor_inputs.append("latents")
    with _watching_x0(pipe.scheduler, seen):
        yield {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": tensor_inputs}


@contextlib.contextmanager
def _watching_x0(scheduler, seen: dict) -> Iterator[None]:
    """Keep the clean-latents prediction of each ``scheduler.step`` in ``seen["x0"]`` while the block is open.

    The step runs as it would (same arguments, same result; asked for its output object and handed back as a
    tuple where the pipeline asked for one: diffusers' pipelines take ``[0]``, the next latents, from it).
    """
    had = "step" in scheduler.__dict__
    before = scheduler.__dict__.get("step")
    step = scheduler.step

    def step_and_keep(*args, return_dict: bool = True, **kwargs):
        output = step(*args, return_dict=True, **kwargs)
        seen["x0"] = next((output[k] for k in X0_FIELDS if output.get(k) is not None), None)
        return output if return_dict else output.to_tuple()

    scheduler.step = step_and_keep
    try:
        yield
    finally:
        if had:
            scheduler.step = before
        else:
            del scheduler.step


def data_url(image, max_side: int | None = None, quality: int = 85) -> str:
    """A preview as a ``data:image/jpeg;base64,...`` URL (at most ``max_side`` px a side): what an event stream
    carries and an ``<img>`` shows."""
    import base64
    import io

    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

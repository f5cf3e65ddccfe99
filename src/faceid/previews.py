"""Live previews of a generation as it forms, and decoding latents as the pipeline does.

* ``decode``: latents -> PIL images through a VAE, the full one or the tiny one (``faceid.tiny_vae``), with the
  pipeline's own postprocessing.
* ``recording_x0``: a call's own scheduler that keeps the prediction of the clean image of its last step.
* ``live_previews``: the step-end callback of one call that shows the image every ``k`` steps and at the last one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .errors import FaceIDError

# Where a scheduler's step output holds its prediction of the clean latents (DDIM, Euler, DDPM...: the first;
# LCM: the second). Schedulers without one (DPM-Solver++, UniPC) are previewed from their current latents.
X0_FIELDS = ("pred_original_sample", "denoised")


# ---------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode(pipe, vae, latents: torch.Tensor, packed: tuple[int, int] | None = None) -> list:
    """PIL images of ``latents`` (in the UNet's space) through ``vae``, as the diffusers pipeline decodes them.

    A half-precision VAE that needs float32 (``force_upcast``, SDXL's) decodes in float32, put back after.
    ``packed``: the (width, height) of images whose latents are packed into a sequence of 2x2 patches (FLUX.1),
    unpacked first by the pipeline's own ``_unpack_latents``; a VAE's ``shift_factor`` is added back as FLUX's
    pipelines add it.
    """
    config = vae.config
    if packed is not None:
        width, height = packed
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    shift = getattr(config, "shift_factor", None)
    upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents)
        std = torch.tensor(std).view(shape).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (shift or 0.0)
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


def recording_x0(scheduler):
    """A copy of ``scheduler`` (same class and configuration, fresh state) whose every ``step`` keeps its
    prediction of the clean latents in ``last_x0``: for a call's own scheduler, so that the call's step callback
    can show it. The step computes what it would (same arguments, same result)."""
    return _recording_class(type(scheduler)).from_config(scheduler.config)


class _KeepsX0:
    last_x0: torch.Tensor | None = None

    def step(self, *args, return_dict: bool = True, **kwargs):
        output = super().step(*args, return_dict=True, **kwargs)
        self.last_x0 = next((output[k] for k in X0_FIELDS if output.get(k) is not None), None)
        return output if return_dict else output.to_tuple()


@functools.cache
def _recording_class(base: type) -> type:
    # The scheduler's own class name: what messages, checks and saved configurations read.
    return type(base.__name__, (_KeepsX0, base), {"__module__": base.__module__})


def live_previews(
    vae,
    every: int | None,
    on_preview: Callable,
    pipeline_kwargs: Mapping[str, Any],
    packed: tuple[int, int] | None = None,
) -> dict:
    """The diffusers arguments that call ``on_preview(step, total, images)`` after every ``every``-th step and
    after the last one, in step order: ``step`` counts the steps done (1..total), ``images`` is one PIL image per
    image of the batch, decoded by ``vae``.

    A preview shows the scheduler's prediction of the finished image at that step (``last_x0`` of the call's
    ``recording_x0`` scheduler), which shows the picture long before the noisy latents do; the last preview is
    the final latents themselves, so it is exactly what ``decode`` makes of them. A user's
    ``callback_on_step_end`` (in ``pipeline_kwargs``) runs first, and the latents it returns are the ones shown.
    Nothing the sampling computes changes: same seed, same image, with or without previews. ``packed``: the
    (width, height) of packed latents (FLUX.1, see ``decode``).
    """
    every = every or 1
    inner = pipeline_kwargs.get("callback_on_step_end")

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        out = inner(pipeline, step, timestep, callback_kwargs) if inner else callback_kwargs
        total = pipeline.num_timesteps
        last = step == total - 1
        if (step + 1) % every == 0 or last:
            latents = out.get("latents", callback_kwargs["latents"])
            x0 = getattr(pipeline.scheduler, "last_x0", None)
            on_preview(step + 1, total, decode(pipeline, vae, latents if last or x0 is None else x0, packed))
        return out

    tensor_inputs = list(pipeline_kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if "latents" not in tensor_inputs:
        tensor_inputs.append("latents")
    return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": tensor_inputs}


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

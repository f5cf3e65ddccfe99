"""Batches that do not fit at once: a call's images in parts, each image as the whole batch would make it.

With one seed per image a batch is separable: every image draws its own noise from its own generator, so a
batch of 12 run as 4 + 4 + 4 gives the same 12 images. ``run_in_parts`` does that for a plan whose
``batch_limit`` is below its batch (on CUDA, from the free memory; or ``max_batch``), and halves the parts
after a CUDA out-of-memory error. Each part decodes one image at a time, as VAEs work per image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .conditioning import Conditioning
from .modes import ModeInputs
from .plan import CallPlan
from .sampling import FaceIDOutput

logger = logging.getLogger(__name__)

RunPart = Callable[..., FaceIDOutput]


def run_in_parts(
    run_part: RunPart,
    plan: CallPlan,
    conditioning: Conditioning,
    inputs: ModeInputs,
    output_type: str,
    on_preview: Callable[[int, int, list], None] | None = None,
    **arguments: Any,
) -> FaceIDOutput:
    """The images of ``plan`` in parts of at most ``plan.batch_limit``, each by ``run_part(plan, conditioning,
    inputs, output_type=..., on_preview=..., sliced_decode=True, **arguments)`` (``faceid.sampling.run_plan``'s
    signature, the models bound). A step callback runs once per part and step; previews go to ``on_preview``
    at their places in the whole batch (the other parts' places hold None)."""
    total = plan.images
    limit = plan.batch_limit or total
    images: list = []
    start = 0
    result = None
    while start < total:
        indices = list(range(start, min(total, start + limit)))
        part = conditioning.images(indices)
        try:
            result = run_part(
                plan.part(indices, part),
                part,
                inputs,
                output_type=output_type,
                on_preview=_placed(on_preview, indices, total),
                sliced_decode=True,
                **arguments,
            )
        except torch.cuda.OutOfMemoryError:
            if limit == 1:
                raise
            torch.cuda.empty_cache()
            limit //= 2
            logger.warning("out of device memory: running %d images at a time", limit)
            continue
        images.extend(list(result.images))
        start += len(indices)
    if output_type != "pil":
        images = np.stack(images) if output_type == "np" else torch.stack(images)
    return FaceIDOutput(
        images=images, faces=conditioning.faces, settings=plan.settings, control_images=result.control_images
    )


def _placed(on_preview: Callable | None, indices: list[int], total: int) -> Callable | None:
    """A part's ``on_preview``: its previews at their places in the whole batch."""
    if on_preview is None:
        return None

    def placed(step: int, steps: int, images: list) -> None:
        whole: list = [None] * total
        for index, image in zip(indices, images, strict=True):
            whole[index] = image
        on_preview(step, steps, whole)

    return placed


__all__ = ["run_in_parts"]

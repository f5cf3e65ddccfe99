"""The tiny VAE (TAESD / TAESDXL): diffusers' ``AutoencoderTiny``, for live previews and a fast final decode.

``load_tiny_vae`` loads one from a released name (``taesd`` for SD1.5, ``taesdxl`` for SDXL, or ``auto``: the
base model family's), downloaded at a pinned Hub commit and refused unless its sha256 is the table's; or from a
local diffusers folder or ``.safetensors`` file. One made for another family is refused.

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MissingWeightsError
from .hub import HubFile

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

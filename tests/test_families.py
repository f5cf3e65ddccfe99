"""The base model families (``faceid.families``): each row's diffusers pipeline classes exist under the names it
makes, the pipelines resolve to their family, FLUX.1's row holds FLUX.1-dev's defaults, and FLUX.1 is refused
where faceid's FaceID adapters would have to run on it."""

from __future__ import annotations

import json

import diffusers
import pytest

from faceid.errors import FaceIDError
from faceid.families import FAMILIES, family, family_of_pipeline
from faceid.model_set import model_family
from faceid.settings import GenerationSettings

TASKS = [
    {},
    {"img2img": True},
    {"inpaint": True},
    {"controlnet": True},
    {"controlnet": True, "img2img": True},
    {"controlnet": True, "inpaint": True},
]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_pipeline_class_exists_and_resolves_to_its_family(name):
    row = family(name)
    for task in TASKS:
        class_name = row.pipeline_class(**task)
        assert hasattr(diffusers, class_name), class_name
        assert family_of_pipeline(class_name) is row


def test_flux_row():
    flux = family("FLUX.1")
    assert [flux.pipeline_class(**task) for task in TASKS] == [
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxControlNetPipeline",
        "FluxControlNetImg2ImgPipeline",
        "FluxControlNetInpaintPipeline",
    ]
    assert (flux.denoiser, flux.attention_kwargs) == ("transformer", "joint_attention_kwargs")
    # FLUX.1-dev's defaults, which diffusers' FluxPipeline also takes (1024 = 128 latent tokens x 8, 28, 3.5).
    assert flux.defaults == {"width": 1024, "height": 1024, "guidance_scale": 3.5, "num_inference_steps": 28}
    resolved = GenerationSettings(prompt="a").resolve("FLUX.1")
    assert (resolved.width, resolved.num_inference_steps, resolved.guidance_scale) == (1024, 28, 3.5)
    assert family_of_pipeline("StableDiffusionXLPipeline").name == "SDXL"
    assert family_of_pipeline("KandinskyPipeline") is None


def test_flux_base_model_is_refused_for_faceid(tmp_path):
    """The FaceID adapters are SD1.5/SDXL only: a FLUX.1 base model is refused before anything loads, saying so."""
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.42"}))
    with pytest.raises(FaceIDError, match=r"FLUX\.1 model: .*made for SD1\.5 and SDXL only"):
        model_family(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert model_family(folder) == "SDXL"

"""GenerationSettings: one description of a request, validated once, resolved per family, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from faceid.errors import FaceIDError
from faceid.settings import DEFAULT_NEGATIVE_PROMPT, GenerationSettings


def test_defaults_resolve_per_family():
    sd15 = GenerationSettings(prompt="a").resolve("SD1.5")
    sdxl = GenerationSettings(prompt="a").resolve("SDXL")
    assert (sd15.width, sd15.height, sd15.guidance_scale, sd15.num_inference_steps) == (512, 768, 7.5, 30)
    assert (sdxl.width, sdxl.height, sdxl.guidance_scale) == (1024, 1024, 5.0)
    assert sd15.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    # What the request gives is kept; known values fill the rest.
    given = GenerationSettings(prompt="a", width=64, scale=0.5).resolve("SDXL", scale=1.0, combine="concat")
    assert (given.width, given.height, given.scale, given.combine) == (64, 1024, 0.5, "concat")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"width": 30}, "width: must be a multiple of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps: Input should be greater than or equal to 1"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"identity_window": (0.8, 0.2)}, "identity_window: must be (start, end)"),
        ({"seed": -1}, "seeds must be integers"),
        ({"seed": []}, "give at least one seed"),
        ({"combine": "sum"}, "combine"),
        ({"scale": float("nan")}, "scale: must be a finite number"),
        ({"stpes": 3}, "stpes: unknown setting"),
    ],
)
def test_bad_values_are_one_error_that_names_them(values, message):
    with pytest.raises(FaceIDError, match="invalid generation settings") as caught:
        GenerationSettings.parse(values)
    assert message in str(caught.value)


def test_json_round_trip_and_per_image_settings():
    settings = GenerationSettings(
        prompt="a", num_images_per_prompt=3, seed=[4, 5, 6], identity_window=(0.0, 0.5), loras={"x.safetensors": 0.5}
    )
    assert GenerationSettings.model_validate_json(settings.model_dump_json()) == settings
    assert GenerationSettings.parse(settings.to_json()) == settings
    image = settings.for_image(1)
    assert (image.seed, image.num_images_per_prompt, image.prompt) == (5, 1, "a")
    with pytest.raises(ValidationError, match="frozen"):  # settings are values, never changed in place
        settings.scale = 2.0


# ---------------------------------------------------------------------- the pipeline takes them
SIZE = {"width": 24, "height": 16, "num_inference_steps": 2, "output_type": "latent"}


def _face():
    return torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)


def test_settings_object_and_keywords_are_the_same_call(pipe):
    by_keywords = pipe("p", _face(), seed=3, scale=0.5, **SIZE)
    settings = GenerationSettings(prompt="p", seed=3, scale=0.5, width=24, height=16, num_inference_steps=2)
    by_object = pipe(face=_face(), settings=settings, output_type="latent")
    torch.testing.assert_close(by_keywords.images, by_object.images, atol=0, rtol=0)
    assert by_keywords.settings == by_object.settings
    resolved = by_object.settings
    assert resolved.guidance_scale == 7.5 and resolved.combine == "mean" and resolved.adapter == pipe.adapter_source
    # A keyword wins over the settings object.
    assert pipe(face=_face(), settings=settings, scale=0.0, output_type="latent").settings.scale == 0.0


def test_a_call_without_seed_records_the_seeds_it_drew(pipe):
    first = pipe("p", _face(), num_images_per_prompt=2, **SIZE)
    assert isinstance(first.settings.seed, list) and len(first.settings.seed) == 2
    again = pipe(face=_face(), settings=first.settings, output_type="latent")
    torch.testing.assert_close(again.images, first.images, atol=0, rtol=0)


def test_unknown_arguments_and_other_models_are_refused(pipe):
    with pytest.raises(FaceIDError, match="unknown argument.*stpes"):
        pipe("p", _face(), stpes=3, **SIZE)
    with pytest.raises(FaceIDError, match="ask for adapter .faceid-sdxl. but this pipeline has"):
        pipe("p", _face(), adapter="faceid-sdxl", **SIZE)
    with pytest.raises(FaceIDError, match="ask for the LoRAs"):
        pipe("p", _face(), loras={"style.safetensors": 1.0}, **SIZE)


def test_conditioning_keeps_what_it_was_encoded_with(pipe):
    conditioning = pipe.encode("p", _face(), num_images_per_prompt=2)
    result = pipe(conditioning=conditioning, seed=[1, 2], **SIZE)
    assert result.settings.num_images_per_prompt == 2 and result.settings.prompt == "p"
    with pytest.raises(FaceIDError, match="num_images_per_prompt=3 differs from the conditioning's 2"):
        pipe(conditioning=conditioning, num_images_per_prompt=3, **SIZE)


def test_for_image_reproduces_each_image_of_several_prompts_alone(pipe):
    """2 prompts x 2 images, one seed each: ``for_image(i)`` is image i alone (prompt i // 2 with face i // 2, its
    negative prompt and seed), bit for bit in the 8-bit image a user gets."""
    faces = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    result = pipe(
        ["p one", "p two"],
        faces,
        negative_prompt=["n one", "n two"],
        num_images_per_prompt=2,
        seed=[11, 12, 13, 14],
        width=24,
        height=16,
        num_inference_steps=2,
        max_batch=1,  # each image's UNet batch as a reproduction runs it (CPU matmuls round by batch size)
    )
    assert len(result.images) == 4
    for i in range(4):
        alone = result.settings.for_image(i)
        assert (alone.prompt, alone.negative_prompt) == (["p one", "p two"][i // 2], ["n one", "n two"][i // 2])
        assert (alone.seed, alone.num_images_per_prompt) == (11 + i, 1)
        (again,) = pipe(face=faces[i // 2 : i // 2 + 1], settings=alone).images
        np.testing.assert_array_equal(np.asarray(again), np.asarray(result.images[i]))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[2]))

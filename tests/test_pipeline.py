"""FaceIDPipeline on the tiny SD1.5 model of the golden folder: inputs, pairing, knobs, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceid.errors import FaceIDError, MissingWeightsError
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 24, "height": 16, "num_inference_steps": 3}


@pytest.fixture(scope="module")
def pipe(golden_dir, face_models_dir):
    from faceid.faces import FaceAnalyzer

    return FaceIDPipeline.from_pretrained(
        golden_dir / "models" / "sd15-tiny",
        golden_dir / "adapters" / "faceid.safetensors",
        device="cpu",
        progress=False,
        face_analyzer=FaceAnalyzer.from_dir(face_models_dir),
    )


def _embeddings(n, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_defaults_follow_the_reference(pipe):
    assert pipe.family == "SD1.5"
    assert type(pipe.pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.pipe.scheduler.config.steps_offset == 1 and not pipe.pipe.scheduler.config.clip_sample
    conditioning = pipe.encode("a prompt", _embeddings(1))
    assert conditioning.negative_prompts == ["monochrome, lowres, bad anatomy, worst quality, low quality"]
    assert pipe.encode(None, _embeddings(1)).prompts == ["best quality, high quality"]


def test_prompt_i_pairs_with_face_i(pipe):
    faces = _embeddings(2)
    both = pipe(["p one", "p two"], faces, num_images_per_prompt=2, seed=3, output_type="np", **SIZE).images
    assert both.shape == (4, 16, 24, 3)
    # The batch is [p0 f0, p0 f0, p1 f1, p1 f1]: the second pair equals a run of (p1, f1) alone.
    second = pipe(
        ["p two"],
        faces[1:],
        num_images_per_prompt=2,
        seed=[5, 6],
        output_type="np",
        latents=_latents_of(pipe, both_seed=3, count=4)[2:],
        **SIZE,
    ).images
    np.testing.assert_allclose(second, both[2:], atol=1e-5)


def _latents_of(pipe, both_seed, count):
    """The starting noise a single seeded generator draws for ``count`` images."""
    shape = (count, 4, SIZE["height"] // pipe.pipe.vae_scale_factor, SIZE["width"] // pipe.pipe.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(both_seed))


def test_one_face_for_many_prompts_and_one_prompt_for_many_faces(pipe):
    assert pipe.encode(["a", "b", "c"], _embeddings(1)).identity.shape[0] == 3
    conditioning = pipe.encode("a", _embeddings(3))
    assert conditioning.prompts == ["a"] * 3 and conditioning.identity.shape[0] == 3
    with pytest.raises(FaceIDError, match="2 prompts but 3 faces"):
        pipe.encode(["a", "b"], _embeddings(3))


def test_per_image_seeds_reproduce_single_images(pipe):
    batch = pipe("p", _embeddings(1), num_images_per_prompt=3, seed=[10, 11, 12], output_type="np", **SIZE).images
    alone = pipe("p", _embeddings(1), seed=[11], output_type="np", **SIZE).images
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    assert not np.allclose(batch[0], batch[1])
    again = pipe("p", _embeddings(1), num_images_per_prompt=3, seed=[10, 11, 12], output_type="np", **SIZE).images
    np.testing.assert_array_equal(again, batch)


def test_scale_is_per_call_and_changes_the_image(pipe):
    base = pipe.adapter.scale
    strong = pipe("p", _embeddings(1), seed=1, scale=1.0, output_type="np", **SIZE).images
    off = pipe("p", _embeddings(1), seed=1, scale=0.0, output_type="np", **SIZE).images
    assert pipe.adapter.scale == base
    assert np.abs(strong - off).max() > 1e-3
    other_face = pipe("p", _embeddings(1, seed=9), seed=1, scale=0.0, output_type="np", **SIZE).images
    np.testing.assert_array_equal(off, other_face)  # scale 0: the face no longer matters


def test_face_inputs_photo_face_and_embedding_agree(pipe, faces_dir):
    photo = faces_dir / "obama.jpg"
    face = pipe.face_analyzer.get(photo)
    from_photo = pipe.encode("p", str(photo)).identity
    from_face = pipe.encode("p", face).identity
    from_embedding = pipe.encode("p", face.embedding).identity
    torch.testing.assert_close(from_photo, from_face)
    torch.testing.assert_close(from_face, from_embedding)
    result = pipe("p", photo, seed=0, **SIZE)
    assert len(result.images) == 1 and result.images[0].size == (24, 16)
    assert result.faces[0].box.shape == (4,)
    assert result.settings["guidance_scale"] == 7.5 and result.settings["num_inference_steps"] == 3


def test_bad_face_inputs(pipe, tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 200), "gray").save(blank)
    with pytest.raises(FaceIDError, match="[Nn]o face"):
        pipe("p", blank, **SIZE)
    with pytest.raises(FaceIDError, match="no face given"):
        pipe("p", None, **SIZE)
    with pytest.raises(FaceIDError, match="128-d but the adapter takes 512-d"):
        pipe.encode("p", torch.randn(1, 128))


def test_missing_models_say_what_to_do(tmp_path, monkeypatch, golden_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="huggingface-cli download someone/not-a-model"):
        FaceIDPipeline.from_pretrained("someone/not-a-model", golden_dir / "adapters" / "faceid.bin")
    with pytest.raises(MissingWeightsError, match="adapter file not found"):
        FaceIDPipeline.from_pretrained("someone/not-a-model", str(tmp_path / "missing.bin"))
    with pytest.raises(MissingWeightsError, match="ip-adapter-faceid_sd15.bin"):
        FaceIDPipeline.from_pretrained(adapter="faceid-sd15")

"""FaceIDPipeline on the tests' tiny SD1.5 model (tiny_models.py): inputs, pairing, knobs, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from faceid.errors import FaceIDError, MissingWeightsError
from faceid.peft_adapters import adapter_weights
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 24, "height": 16, "num_inference_steps": 3}


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
    assert result.settings.guidance_scale == 7.5 and result.settings.num_inference_steps == 3


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


def test_missing_models_say_what_to_do(tmp_path, monkeypatch, tiny_models):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="huggingface-cli download someone/not-a-model"):
        FaceIDPipeline.from_pretrained("someone/not-a-model", tiny_models.adapter("faceid", "bin"))
    with pytest.raises(MissingWeightsError, match="adapter file not found"):
        FaceIDPipeline.from_pretrained("someone/not-a-model", str(tmp_path / "missing.bin"))
    with pytest.raises(MissingWeightsError, match="ip-adapter-faceid_sd15.bin"):
        FaceIDPipeline.from_pretrained(adapter="faceid-sd15")


# ---------------------------------------------------------------------- step window
def test_identity_window_covering_every_step_is_no_window(pipe):
    face = _embeddings(1)
    plain = pipe("p", face, seed=2, output_type="np", **SIZE).images
    window = pipe("p", face, seed=2, output_type="np", identity_window=(0.0, 1.0), **SIZE).images
    np.testing.assert_array_equal(window, plain)


def test_empty_identity_window_is_the_adapter_off_bit_for_bit(pipe, tiny_models):
    from diffusers import StableDiffusionPipeline

    face = _embeddings(1)
    off = pipe("p", face, seed=2, output_type="np", identity_window=(0.5, 0.5), **SIZE).images
    assert pipe.adapter.active and pipe.adapter.scale == 1.0  # switched back on after the call
    # The base model alone, same text embeddings and starting noise, no adapter anywhere.
    plain = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None)
    plain.scheduler = type(pipe.pipe.scheduler).from_config(pipe.pipe.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    text = pipe.encode("p", face).pipe_kwargs
    base = plain(
        prompt_embeds=text["prompt_embeds"],
        negative_prompt_embeds=text["negative_prompt_embeds"],
        generator=torch.Generator().manual_seed(2),
        guidance_scale=7.5,
        output_type="np",
        **SIZE,
    ).images
    np.testing.assert_array_equal(off, base)
    full = pipe("p", face, seed=2, output_type="np", **SIZE).images
    early = pipe("p", face, seed=2, output_type="np", identity_window=(0.0, 0.5), **SIZE).images
    assert np.abs(early - full).max() > 1e-5 and np.abs(early - off).max() > 1e-5


def test_identity_window_is_validated_and_user_callbacks_still_run(pipe):
    with pytest.raises(FaceIDError, match="identity_window"):
        pipe("p", _embeddings(1), identity_window=(0.8, 0.2), **SIZE)
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        in_force = adapter_weights(pipe.pipe.unet)[pipe.adapter.name]  # the identity LoRA's weight on the UNet
        seen.append((step, in_force, pipe.adapter.active))
        return kwargs

    pipe("p", _embeddings(1), seed=0, identity_window=(0.0, 0.5), callback_on_step_end=callback, **SIZE)
    # steps 0,1 of 3 are inside [0, 0.5) for i/3 < 0.5 -> 0 and 1; the callback sees the next step's state
    # (the user's own setting, ``active``, stays on throughout), and the user's weight is back after the call
    assert seen == [(0, 1.0, True), (1, 0.0, True), (2, 0.0, True)]
    assert adapter_weights(pipe.pipe.unet)[pipe.adapter.name] == 1.0


# ---------------------------------------------------------------------- several photos of one person
def test_mean_combines_normalised_embeddings(pipe):
    a, b = _embeddings(2)
    combined = pipe.encode("p", [[a, b]], combine="mean").identity
    mean = torch.nn.functional.normalize((a + b) / 2, dim=-1)
    torch.testing.assert_close(combined, pipe.encode("p", mean).identity)


def test_concat_gives_tokens_per_photo(pipe):
    a, b = _embeddings(2)
    both = pipe.encode("p", [[a, b]], combine="concat").identity
    assert both.shape == (1, 8, 64)
    torch.testing.assert_close(both[:, 4:], pipe.encode("p", b).identity)
    with pytest.raises(FaceIDError, match="same number of photos"):
        pipe.encode(["p", "q"], [[a, b], [a]], combine="concat")
    with pytest.raises(FaceIDError, match="combine: Input should be .mean. or .concat."):
        pipe.encode("p", [[a, b]], combine="median")


def test_several_real_photos_of_one_person(pipe, faces_dir):
    photos = (faces_dir / "obama.jpg", faces_dir / "obama2.jpg")
    conditioning = pipe.encode("p", [photos])
    assert len(conditioning.faces) == 1 and len(conditioning.faces[0]) == 2
    single = [pipe.face_analyzer.get(p).embedding for p in photos]
    mean = torch.nn.functional.normalize(torch.tensor(np.mean(single, axis=0)), dim=-1)
    torch.testing.assert_close(conditioning.identity, pipe.encode("p", mean).identity)
    images = pipe("p", [photos], seed=0, output_type="np", **SIZE).images
    assert images.shape == (1, 16, 24, 3)


# ---------------------------------------------------------------------- Plus and Portrait
@pytest.fixture(scope="module")
def plus_pipe(tiny_models, face_models_dir):
    from faceid.faces import FaceAnalyzer

    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15,
        tiny_models.adapter("faceid-plusv2", "bin"),
        image_encoder=tiny_models.image_encoder,
        device="cpu",
        progress=False,
        face_analyzer=FaceAnalyzer.from_dir(face_models_dir),
    )


def test_plus_uses_the_aligned_224_crop_of_each_photo(plus_pipe, faces_dir):
    assert plus_pipe.shortcut  # a *plusv2* file
    face = plus_pipe.face_analyzer.get(faces_dir / "obama.jpg")
    from_photo = plus_pipe.encode("p", faces_dir / "obama.jpg")
    from_parts = plus_pipe.encode("p", face.embedding, face_image=Image.fromarray(face.crop_224))
    torch.testing.assert_close(from_photo.identity, from_parts.identity)
    assert from_photo.clip["clip_pixel_values"].shape == (1, 3, 224, 224)
    without_shortcut = plus_pipe.encode("p", face, shortcut=False).identity
    assert not torch.allclose(without_shortcut, from_photo.identity)
    half = plus_pipe.encode("p", face, s_scale=0.5).identity
    torch.testing.assert_close(  # shortcut: tokens = x + s_scale * perceiver, linear in s_scale
        (from_photo.identity + plus_pipe.encode("p", face, s_scale=0.0).identity) / 2, half, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(FaceIDError, match="aligned face image"):
        plus_pipe.encode("p", face.embedding)


def test_plus_several_photos(plus_pipe, faces_dir):
    photos = (faces_dir / "obama.jpg", faces_dir / "obama2.jpg")
    mean = plus_pipe.encode("p", [photos], combine="mean")
    concat = plus_pipe.encode("p", [photos], combine="concat")
    assert mean.identity.shape == (1, 4, 64) and concat.identity.shape == (1, 8, 64)
    assert mean.clip["clip_embeds"].shape == (1, 50, 48) and concat.clip["clip_embeds"].shape == (1, 2, 50, 48)
    images = plus_pipe("p", [photos], seed=0, output_type="np", **SIZE).images
    assert images.shape == (1, 16, 24, 3)


def test_portrait_takes_any_number_of_photos_per_call(tiny_models, face_models_dir, faces_dir):
    pipe = FaceIDPipeline.from_pretrained(
        tiny_models.sd15,
        tiny_models.adapter("faceid-portrait", "bin"),
        device="cpu",
        progress=False,
    )
    assert pipe.default_combine == "concat"
    outputs = {}
    for count in (1, 2, 5, 3):
        faces = _embeddings(count)
        conditioning = pipe.encode("p", [list(faces)])
        assert conditioning.identity.shape == (1, 16 * count, 64)
        outputs[count] = pipe(conditioning=conditioning, seed=0, output_type="np", **SIZE).images
    assert not np.allclose(outputs[2], outputs[3])


def test_single_file_base_models_go_to_the_right_diffusers_loader(tmp_path, monkeypatch):
    """A single .safetensors base model is read by diffusers' from_single_file of its family (SDXL files
    have a "conditioner"); what from_single_file does with it is diffusers' own, tested there."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from faceid.pipeline import load_base_pipeline

    calls = []

    def fake_loader(cls, path, **kwargs):
        calls.append((cls.__name__, path, kwargs))
        raise OSError("no config here")

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(fake_loader))
    sd15, sdxl = tmp_path / "sd15.safetensors", tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd15))
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(sdxl))
    for path, expected in ((sd15, "StableDiffusionPipeline"), (sdxl, "StableDiffusionXLPipeline")):
        with pytest.raises(MissingWeightsError, match=path.name):
            load_base_pipeline(path, torch.float16)
        assert calls[-1][0] == expected and calls[-1][1] == str(path)
        assert calls[-1][2]["dtype"] == torch.float16 and "config" not in calls[-1][2]
    with pytest.raises(MissingWeightsError):
        load_base_pipeline(sd15, torch.float32, single_file_config=tmp_path / "sd15-config")
    assert calls[-1][2]["config"] == str(tmp_path / "sd15-config")  # offline: the config from a local folder


def test_clip_face_crops_use_the_pil_image_processor_even_with_torchvision(monkeypatch, tiny_models):
    """With torchvision installed, transformers' CLIPImageProcessor is its torchvision implementation, which
    resizes differently from the reference's PIL preprocessing: the Plus encoder and CLIP-T keep the PIL one."""
    import transformers
    from transformers import CLIPVisionModelWithProjection

    from faceid.identity import CLIPFaceEncoder, clip_image_processor

    pil = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil is None:
        pytest.skip("this transformers has one CLIP image processor only")

    class TorchvisionProcessor:  # stands for the torchvision implementation a torchvision machine gets
        pass

    monkeypatch.setattr(transformers, "CLIPImageProcessor", TorchvisionProcessor)
    assert clip_image_processor() is pil
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_models.image_encoder)
    assert type(CLIPFaceEncoder(model).processor) is pil

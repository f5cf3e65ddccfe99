"""The tiny VAE (TAESD/TAESDXL) and live previews, on the tiny SD1.5 and SDXL models with a tiny AutoencoderTiny."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_variants import _fake_download, _own_hash_cache  # noqa: F401 (an autouse fixture: own hash cache)
from tiny_models import make_tiny_autoencoder

from faceid import previews, tiny_vae
from faceid.errors import CheckpointError, FaceIDError, MissingWeightsError
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 24, "height": 16}
ADAPTERS = {"sd15": "faceid", "sdxl": "faceid-sdxl"}


def _embedding(seed=0):
    return torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_autoencoder(tmp_path_factory.mktemp("tiny-vae"))


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny_pipe(request, tiny_models, analyzer, tiny_vae_dir):
    """FaceIDPipeline on a tiny base model of each family, with the tiny AutoencoderTiny loaded."""
    family = request.param
    return FaceIDPipeline.from_pretrained(
        getattr(tiny_models, family),
        tiny_models.adapter(ADAPTERS[family], "safetensors"),
        tiny_vae=tiny_vae_dir,
        device="cpu",
        progress=False,
        face_analyzer=analyzer,
    )


def _arrays(images):
    return [np.asarray(image) for image in images]


def _collect():
    seen = []
    return seen, lambda step, total, images: seen.append((step, total, images))


# ---------------------------------------------------------------------------------------------- previews
def test_previews_arrive_in_step_order_every_k_and_the_last_is_the_final_latents_decoded(tiny_pipe):
    seen, on_preview = _collect()
    run = {"seed": [3, 4], "num_images_per_prompt": 2, "num_inference_steps": 5, **SIZE}
    result = tiny_pipe("p", _embedding(), preview_every=2, on_preview=on_preview, decoder="tiny", **run)
    assert [(step, total) for step, total, _ in seen] == [(2, 5), (4, 5), (5, 5)]  # every 2nd, and the last
    assert all(len(images) == 2 and images[0].size == (24, 16) for _, _, images in seen)
    latents = tiny_pipe("p", _embedding(), output_type="latent", **run).images
    last = _arrays(seen[-1][2])
    for got, want in zip(last, _arrays(previews.decode(tiny_pipe.pipe, tiny_pipe.tiny_vae, latents)), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(last, _arrays(result.images), strict=True):  # the tiny decode of the image itself
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(_arrays(seen[0][2])[0], last[0])  # an earlier preview is another picture


def test_previews_show_the_predicted_image_rather_than_the_noisy_latents(pipe):
    """Without a tiny VAE the full VAE decodes them; before the last step they show the scheduler's x0."""
    steps_latents = []

    def user_callback(pipeline, step, timestep, callback_kwargs):
        steps_latents.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    seen, on_preview = _collect()
    pipe("p", _embedding(), seed=1, num_inference_steps=4, preview_every=1, on_preview=on_preview,
         callback_on_step_end=user_callback, **SIZE)  # fmt: skip
    assert [step for step, _, _ in seen] == [1, 2, 3, 4] and len(steps_latents) == 4
    noisy = _arrays(previews.decode(pipe.pipe, pipe.pipe.vae, steps_latents[0]))[0]
    assert not np.array_equal(_arrays(seen[0][2])[0], noisy)
    final = _arrays(previews.decode(pipe.pipe, pipe.pipe.vae, steps_latents[-1]))[0]
    np.testing.assert_array_equal(_arrays(seen[-1][2])[0], final)


def test_the_recording_scheduler_steps_as_its_original_and_keeps_x0(pipe):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.pipe.scheduler.config)
    recording = previews.recording_x0(scheduler)
    assert isinstance(recording, DDIMScheduler) and type(recording).__name__ == "DDIMScheduler"
    assert recording is not scheduler and dict(recording.config) == dict(scheduler.config)
    for s in (scheduler, recording):
        s.set_timesteps(4)
    noise, sample = torch.randn(1, 4, 8, 12), torch.randn(1, 4, 8, 12)
    t = scheduler.timesteps[0]
    plain = scheduler.step(noise, t, sample, return_dict=True)
    as_tuple = recording.step(noise, t, sample, return_dict=False)
    assert not hasattr(scheduler, "last_x0") or scheduler.last_x0 is None  # the original is left as it was
    torch.testing.assert_close(as_tuple[0], plain.prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(recording.last_x0, plain.pred_original_sample, rtol=0, atol=0)


def test_previews_change_nothing_and_compose_with_the_window_and_a_user_callback(tiny_pipe):
    steps = []

    def user_callback(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        return callback_kwargs

    run = {"seed": 7, "num_inference_steps": 4, "identity_window": (0.0, 0.5), "output_type": "np", **SIZE}
    plain = tiny_pipe("p", _embedding(), **run).images
    seen, on_preview = _collect()
    with_all = tiny_pipe(
        "p", _embedding(), preview_every=3, on_preview=on_preview, callback_on_step_end=user_callback, **run
    ).images
    np.testing.assert_array_equal(with_all, plain)  # bit for bit
    assert steps == [0, 1, 2, 3] and [step for step, _, _ in seen] == [3, 4]
    no_window = tiny_pipe("p", _embedding(), **{**run, "identity_window": None}).images
    assert not np.array_equal(no_window, plain)  # the window acted in both runs


def test_nothing_of_a_call_stays_on_the_pipeline(tiny_pipe):
    full_vae, scheduler = tiny_pipe.pipe.vae, tiny_pipe.pipe.scheduler
    run = {"seed": 2, "num_inference_steps": 3, "output_type": "np", **SIZE}
    before = tiny_pipe("p", _embedding(), **run).images
    tiny_pipe("p", _embedding(), decoder="tiny", preview_every=1, on_preview=lambda *a: None, **run)
    with pytest.raises(RuntimeError, match="stop"):  # a failing preview consumer: still put back
        tiny_pipe("p", _embedding(), decoder="tiny", on_preview=_raise, **run)
    assert tiny_pipe.pipe.vae is full_vae and tiny_pipe.pipe.scheduler is scheduler
    assert "step" not in scheduler.__dict__ and tiny_pipe.pipe.config.vae[1] == "AutoencoderKL"
    np.testing.assert_array_equal(tiny_pipe("p", _embedding(), **run).images, before)


def _raise(*args):
    raise RuntimeError("stop")


def test_bad_preview_arguments(pipe):
    with pytest.raises(FaceIDError, match="preview_every needs on_preview"):
        pipe("p", _embedding(), preview_every=2, **SIZE)
    with pytest.raises(FaceIDError, match="at least 1"):
        pipe("p", _embedding(), preview_every=0, on_preview=print, **SIZE)


def test_a_preview_as_a_data_url():
    image = Image.new("RGB", (400, 200), "red")
    url = previews.data_url(image, max_side=100)
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as back:
        assert back.size == (100, 50) and back.getpixel((50, 25))[0] > 200


# ---------------------------------------------------------------------------------------------- tiny decode
def test_the_tiny_decoder_is_per_call_and_recorded(tiny_pipe, tiny_vae_dir):
    run = {"seed": 5, "num_inference_steps": 3, "output_type": "np", **SIZE}
    full = tiny_pipe("p", _embedding(), **run)
    tiny = tiny_pipe("p", _embedding(), decoder="tiny", **run)
    assert full.settings.decoder == "full" and tiny.settings.decoder == "tiny"
    assert tiny.settings.tiny_vae == full.settings.tiny_vae == str(tiny_vae_dir)
    assert full.images.shape == tiny.images.shape and not np.allclose(full.images, tiny.images)
    latents = tiny_pipe("p", _embedding(), output_type="latent", **{k: v for k, v in run.items() if k != "output_type"})
    want = np.stack([np.asarray(i) for i in previews.decode(tiny_pipe.pipe, tiny_pipe.tiny_vae, latents.images)])
    np.testing.assert_allclose(tiny.images, want / 255.0, atol=1 / 255 + 1e-6)  # np output is not rounded to 8 bits
    again = tiny_pipe("p", _embedding(), settings=tiny.settings, output_type="np").images
    np.testing.assert_array_equal(again, tiny.images)  # the settings reproduce it


def test_a_tiny_decode_needs_the_tiny_vae_loaded(pipe, tiny_pipe):
    with pytest.raises(FaceIDError, match="decoder 'tiny' needs a tiny VAE.*tiny_vae='auto'"):
        pipe("p", _embedding(), decoder="tiny", **SIZE)
    with pytest.raises(FaceIDError, match="ask for tiny_vae 'taesd'"):
        tiny_pipe("p", _embedding(), tiny_vae="taesd", **SIZE)
    assert pipe("p", _embedding(), num_inference_steps=1, **SIZE).settings.tiny_vae is None


# ---------------------------------------------------------------------------------------------- loading
def test_the_other_familys_tiny_vae_is_refused(tiny_models, pipe, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="made for SD1.5 latents but this is an SDXL model.*taesdxl"):
        FaceIDPipeline.from_pretrained(
            tiny_models.sdxl, tiny_models.adapter("faceid-sdxl", "safetensors"), tiny_vae="madebyollin/taesd",
            device="cpu", progress=False,
        )  # fmt: skip
    # A local copy of a released file is known by its sha256 (here: the table says so for this file).
    folder = make_tiny_autoencoder(tmp_path / "copy")
    weights = folder / tiny_vae.WEIGHTS
    _pin(monkeypatch, "taesdxl", hashlib.sha256(weights.read_bytes()).hexdigest())
    base_vae = pipe.pipe.vae
    for source in (folder, weights):
        with pytest.raises(CheckpointError, match="made for SDXL latents but this is an SD1.5 model.*taesd"):
            tiny_vae.load_tiny_vae(source, "SD1.5", base_vae, torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="decodes 8-channel latents; this model's have 4"):
        tiny_vae.load_tiny_vae(make_tiny_autoencoder(tmp_path / "c8", latent_channels=8), "SD1.5", base_vae,
                               torch.float32, "cpu")  # fmt: skip
    with pytest.raises(CheckpointError, match="upsamples latents 4x; this model's VAE does 2x"):
        tiny_vae.load_tiny_vae(make_tiny_autoencoder(tmp_path / "x4", blocks=3), "SD1.5", base_vae,
                               torch.float32, "cpu")  # fmt: skip
    with pytest.raises(CheckpointError, match="does not hold TAESD weights in the diffusers layout"):
        tiny_vae.load_tiny_vae(weights, "SDXL", base_vae, torch.float32, "cpu")  # not the released shapes
    with pytest.raises(MissingWeightsError, match="tiny VAE 'nowhere' not found.*taesd"):
        tiny_vae.load_tiny_vae("nowhere", "SD1.5", base_vae, torch.float32, "cpu")


def _pin(monkeypatch, name, sha256):
    from dataclasses import replace

    release = tiny_vae.TINY_VAES[name]
    pinned = replace(release, file=replace(release.file, sha256=sha256))
    monkeypatch.setitem(tiny_vae.TINY_VAES, name, pinned)
    return pinned


def test_released_tiny_vaes_are_pinned():
    assert set(tiny_vae.FAMILY_TINY_VAE.items()) == {("SD1.5", "taesd"), ("SDXL", "taesdxl")}
    for name, release in tiny_vae.TINY_VAES.items():
        assert release.file.repo == f"madebyollin/{name}" and release.file.filename == tiny_vae.WEIGHTS
        assert len(release.file.revision) == 40 and len(release.file.sha256) == 64 and release.file.size == 9793292
    assert tiny_vae.tiny_vae_name("auto", "SDXL") == "taesdxl"
    assert tiny_vae.tiny_vae_name("madebyollin/taesd", "SDXL") == "taesd"


def test_the_pinned_download_offline_on_a_fake_hub_cache(tmp_path, monkeypatch, pipe):
    """The real hf_hub_download, offline: the family's tiny VAE at its pinned commit, refused unless its hash is."""
    import huggingface_hub.constants
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    torch.manual_seed(0)
    released = AutoencoderTiny()  # the released architecture, random weights
    data = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(data))
    release = _pin(monkeypatch, "taesd", hashlib.sha256(data.read_bytes()).hexdigest())
    snapshot = tmp_path / "hub" / "models--madebyollin--taesd" / "snapshots" / release.file.revision
    snapshot.mkdir(parents=True)
    blob = tmp_path / "hub" / "models--madebyollin--taesd" / "blobs" / release.file.sha256
    blob.parent.mkdir()
    blob.write_bytes(b"a truncated download")
    (snapshot / tiny_vae.WEIGHTS).symlink_to(blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_vae = _vae_with_8x_upsampling()
    with pytest.raises(CheckpointError, match=release.file.sha256):
        tiny_vae.load_tiny_vae("auto", "SD1.5", base_vae, torch.float32, "cpu")
    blob.write_bytes(data.read_bytes())
    vae, name = tiny_vae.load_tiny_vae("auto", "SD1.5", base_vae, torch.float32, "cpu")
    assert name == "taesd" and isinstance(vae, AutoencoderTiny)
    for key, value in released.state_dict().items():
        torch.testing.assert_close(vae.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(MissingWeightsError, match=f"at commit {tiny_vae.TINY_VAES['taesdxl'].file.revision}"):
        tiny_vae.load_tiny_vae("taesdxl", "SDXL", base_vae, torch.float32, "cpu")  # not in the cache
    calls = []
    _fake_download(monkeypatch, data, calls)
    tiny_vae.load_tiny_vae("taesd", "SD1.5", base_vae, torch.float32, "cpu")
    assert calls[0][:2] == ("madebyollin/taesd", tiny_vae.WEIGHTS)
    assert calls[0][2]["revision"] == release.file.revision


def _vae_with_8x_upsampling():
    """The config a real SD VAE has where the tiny VAE's checks look (4 latent channels, 4 blocks: 8x)."""
    from types import SimpleNamespace

    return SimpleNamespace(config=SimpleNamespace(latent_channels=4, block_out_channels=(128, 256, 512, 512)))


# ---------------------------------------------------------------------------------------------- command line
def test_generate_saves_previews_and_decodes_with_the_tiny_vae(
    tmp_path, faces_dir, tiny_models, face_models_dir, tiny_vae_dir
):
    from faceid.cli import main
    from faceid.outputs import read_settings

    out = tmp_path / "out"
    argv = [
        "generate", "--face", str(faces_dir / "obama.jpg"), "--prompt", "a photo", "--out", str(out),
        "--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors")),
        "--face-models", str(face_models_dir), "--steps", "3", "--width", "24", "--height", "16", "-n", "2",
        "--seed", "7", "--tiny-vae", str(tiny_vae_dir), "--preview-every", "2", "--preview-dir", str(tmp_path / "pv"),
    ]  # fmt: skip
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "pv").iterdir())
    assert names == [f"obama_s{s}-step{k:03d}.png" for s in (7, 8) for k in (2, 3)]
    image = out / "obama_s7.png"
    settings = read_settings(image)
    assert settings["decoder"] == "tiny" and settings["model_files"]["tiny_vae"] == {"name": tiny_vae_dir.name}
    final = np.asarray(Image.open(image))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pv" / "obama_s7-step003.png")), final)
    # The PNG reproduces it, the tiny decode included, with the local model folders and files given again.
    again = tmp_path / "again"
    argv = ["generate", "--settings", str(image), "--face", str(faces_dir / "obama.jpg"), "--out", str(again),
            "--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors")),
            "--tiny-vae", str(tiny_vae_dir)]  # fmt: skip
    assert main(argv + ["--face-models", str(face_models_dir)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again / "obama_s7.png")), final)

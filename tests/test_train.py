"""Training on a small dataset made from real photos: learning, exact resume, stop-and-save, 2 processes,
and exported checkpoints that load here and in diffusers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from faceid.checkpoints import load_state_dict
from faceid.errors import FaceIDError
from faceid.train import TrainConfig, Trainer, list_checkpoints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, faces_dir, face_models_dir):
    """Real photos, augmented (mirror, crop, rescale), prepared with YuNet + the stand-in recognizer."""
    from faceid.data import prepare_dataset
    from faceid.faces import FaceAnalyzer

    root = tmp_path_factory.mktemp("train-data")
    images = root / "images"
    images.mkdir()
    lines = []
    for name in ("obama", "obama2", "biden"):
        photo = Image.open(faces_dir / f"{name}.jpg").convert("RGB")
        w, h = photo.size
        variants = {
            "a": photo,
            "mirror": ImageOps.mirror(photo),
            "small": photo.resize((w * 2 // 3, h * 2 // 3)),
            "crop": photo.crop((w // 10, 0, w - w // 10, h - h // 8)),
        }
        for tag, image in variants.items():
            image.save(images / f"{name}_{tag}.jpg")
            lines.append(json.dumps({"file_name": f"{name}_{tag}.jpg", "text": "a photo of a person"}))
    (images / "metadata.jsonl").write_text("\n".join(lines))
    out = root / "dataset"
    report = prepare_dataset(images, out, lambda: FaceAnalyzer.from_dir(face_models_dir), progress=False)
    assert report.kept == 12
    return out


def _config(dataset, tiny_models, output_dir, **overrides) -> TrainConfig:
    settings = dict(
        base_model=str(tiny_models.sd15),
        dataset=str(dataset),
        output_dir=str(output_dir),
        resolution=16,
        train_batch_size=3,
        lora_rank=4,
        learning_rate=1e-3,
        max_train_steps=6,
        checkpointing_steps=0,
        report_to="none",
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig.from_file(None, **settings)


def _trained_state(output_dir: Path) -> dict:
    """The exported adapter (named after its variant: ip-adapter-faceid[-plus|-plusv2|-portrait])."""
    (path,) = (p for p in output_dir.glob("ip-adapter-faceid*.safetensors") if not p.stem.endswith("_lora"))
    return load_state_dict(path)


def _assert_same_state(a: dict, b: dict) -> None:
    for group in a:
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}.{key} differs"


def test_resume_gives_the_same_weights_as_one_run(dataset, tiny_models, tmp_path):
    one = tmp_path / "one"
    Trainer(_config(dataset, tiny_models, one, max_train_steps=6)).train()

    split = tmp_path / "split"
    first = Trainer(_config(dataset, tiny_models, split, max_train_steps=3, checkpointing_steps=3)).train()
    assert first["global_step"] == 3 and (split / "checkpoint-3").is_dir()
    second = Trainer(_config(dataset, tiny_models, split, max_train_steps=6, resume_from_checkpoint="latest")).train()
    assert second["global_step"] == 6
    _assert_same_state(_trained_state(one), _trained_state(split))
    fresh = _trained_state(tmp_path / "one")
    assert not torch.equal(fresh["image_proj"]["norm.weight"], torch.ones_like(fresh["image_proj"]["norm.weight"]))


def test_8bit_adam_trains_and_resumes_exactly(dataset, tiny_models, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    one = tmp_path / "one"
    trainer = Trainer(_config(dataset, tiny_models, one, max_train_steps=4, use_8bit_adam=True))
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert any(state["state1"].dtype == torch.uint8 for state in states)  # the large weights keep 8-bit moments

    split = tmp_path / "split"
    Trainer(_config(dataset, tiny_models, split, max_train_steps=2, checkpointing_steps=2, use_8bit_adam=True)).train()
    Trainer(
        _config(dataset, tiny_models, split, max_train_steps=4, resume_from_checkpoint="latest", use_8bit_adam=True)
    ).train()
    _assert_same_state(_trained_state(one), _trained_state(split))
    plain = tmp_path / "plain"
    Trainer(_config(dataset, tiny_models, plain, max_train_steps=4)).train()
    eight, full = _trained_state(one)["image_proj"], _trained_state(plain)["image_proj"]
    assert not torch.equal(eight["proj.0.weight"], full["proj.0.weight"])  # a different optimizer really ran


def test_stop_signal_saves_a_checkpoint_that_resumes_exactly(dataset, tiny_models, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    Trainer(_config(dataset, tiny_models, reference, max_train_steps=5)).train()

    stopped = tmp_path / "stopped"
    trainer = Trainer(_config(dataset, tiny_models, stopped, max_train_steps=5))
    original = Trainer.training_loss
    calls = []

    def loss_then_signal(self, batch, generator):
        calls.append(1)
        if len(calls) == 2:  # the scheduler sends SIGTERM during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, generator)

    monkeypatch.setattr(Trainer, "training_loss", loss_then_signal)
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    result = trainer.train()
    monkeypatch.setattr(Trainer, "training_loss", original)
    # The trainer's handlers live only while it trains: the process's own are back afterwards.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert result["stopped"] and result["global_step"] == 2
    assert [p.name for p in list_checkpoints(stopped)] == ["checkpoint-2"]
    assert not (stopped / "ip-adapter-faceid.bin").exists()  # not exported: the run is not finished
    Trainer(_config(dataset, tiny_models, stopped, max_train_steps=5, resume_from_checkpoint="latest")).train()
    _assert_same_state(_trained_state(reference), _trained_state(stopped))


def test_fine_tuning_starts_from_a_released_checkpoint(dataset, tiny_models, tmp_path):
    released = load_state_dict(tiny_models.adapter("faceid", "bin"))
    untouched = tmp_path / "zero"
    Trainer(
        _config(
            dataset,
            tiny_models,
            untouched,
            init_adapter=str(tiny_models.adapter("faceid", "bin")),
            max_train_steps=0,
            lora_rank=None,
        )
    ).train()
    _assert_same_state(released, _trained_state(untouched))  # the layout and every weight come from the file
    tuned = tmp_path / "tuned"
    Trainer(
        _config(
            dataset,
            tiny_models,
            tuned,
            init_adapter=str(tiny_models.adapter("faceid", "safetensors")),
            max_train_steps=2,
        )
    ).train()
    state = _trained_state(tuned)
    assert state["image_proj"].keys() == released["image_proj"].keys()
    assert state["ip_adapter"].keys() == released["ip_adapter"].keys()  # same rank and layers as the release
    moved = (state["image_proj"]["proj.0.weight"] - released["image_proj"]["proj.0.weight"]).abs().max()
    assert 0 < moved < 0.01  # two steps at lr 1e-3 from the released weights, not from scratch


def test_gradient_checkpointing_gives_the_same_weights(dataset, tiny_models, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    Trainer(_config(dataset, tiny_models, plain, max_train_steps=2)).train()
    Trainer(_config(dataset, tiny_models, checkpointed, max_train_steps=2, gradient_checkpointing=True)).train()
    a, b = _trained_state(plain), _trained_state(checkpointed)
    for group in a:
        for key in a[group]:
            torch.testing.assert_close(a[group][key], b[group][key], rtol=0, atol=1e-6, msg=f"{group}.{key}")


def test_gradient_accumulation_counts_optimizer_steps_and_resumes_exactly(dataset, tiny_models, tmp_path):
    one = tmp_path / "one"
    trainer = Trainer(_config(dataset, tiny_models, one, max_train_steps=3, gradient_accumulation_steps=2))
    trainer.train()
    assert [h["step"] for h in trainer.history] == [1, 2, 3]  # optimizer steps, each from 2 batches
    split = tmp_path / "split"
    Trainer(
        _config(dataset, tiny_models, split, max_train_steps=2, gradient_accumulation_steps=2, checkpointing_steps=2)
    ).train()
    Trainer(
        _config(
            dataset,
            tiny_models,
            split,
            max_train_steps=3,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
        )
    ).train()
    _assert_same_state(_trained_state(one), _trained_state(split))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a new mixed-precision setting needs it reset (before and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_trains_fp32_weights(dataset, tiny_models, tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    out = tmp_path / "bf16"
    trainer = Trainer(_config(dataset, tiny_models, out, max_train_steps=3, mixed_precision="bf16"))
    trainer.train()
    assert trainer.pipe.unet.conv_in.weight.dtype == torch.bfloat16  # the frozen UNet runs in bf16
    assert all(p.dtype == torch.float32 for p in trainer.trainable_parameters())  # the trained weights do not
    assert all(np.isfinite(h["loss"]) for h in trainer.history)
    AcceleratorState._reset_state(reset_partial_state=True)
    start = _trained_state_of(dataset, tiny_models, tmp_path / "start", max_train_steps=0)
    reference = _trained_state_of(dataset, tiny_models, tmp_path / "fp32")
    bf16 = _trained_state(out)
    assert bf16["ip_adapter"].keys() == reference["ip_adapter"].keys()
    # The same training, rounded differently: the bf16 updates point the way the fp32 ones do.
    for key in ("proj.0.weight", "proj.2.weight"):
        ours, theirs = (s["image_proj"][key].float() - start["image_proj"][key].float() for s in (bf16, reference))
        assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.9, key


def _trained_state_of(dataset, tiny_models, output_dir, **overrides) -> dict:
    Trainer(_config(dataset, tiny_models, output_dir, **{"max_train_steps": 3, **overrides})).train()
    return _trained_state(output_dir)


def test_config_files_and_bad_settings(tmp_path, tiny_models, dataset):
    path = tmp_path / "train.yaml"
    path.write_text(f"base_model: {tiny_models.sd15}\ndataset: {dataset}\nlearning_rate: 1e-4\n")
    config = TrainConfig.from_file(path, max_train_steps="7")
    assert config.learning_rate == 1e-4 and config.max_train_steps == 7 and config.variant == "faceid"
    path.write_text("base_model: x\ndataset: y\nlearnin_rate: 1\n")
    with pytest.raises(FaceIDError, match="unknown training settings.*learnin_rate"):
        TrainConfig.from_file(path)
    with pytest.raises(FaceIDError, match="variant"):
        TrainConfig.from_file(None, base_model="x", dataset="y", variant="turbo")
    with pytest.raises(FaceIDError, match="not a int"):
        TrainConfig.from_file(None, base_model="x", dataset="y", max_train_steps="many")
    # a wrong dataset is reported before the base model is even looked for
    missing = TrainConfig.from_file(None, base_model="no/such-model", dataset=str(tmp_path / "nope"))
    with pytest.raises(FaceIDError, match="Dataset folder not found.*faceid prepare"):
        Trainer(missing).setup()


def test_exported_adapter_loads_here_and_in_diffusers_with_equal_outputs(dataset, tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    from faceid.pipeline import FaceIDPipeline

    out = tmp_path / "run"
    Trainer(_config(dataset, tiny_models, out, max_train_steps=4)).train()
    for name in ("ip-adapter-faceid.bin", "ip-adapter-faceid.safetensors", "ip-adapter-faceid_lora.safetensors"):
        assert (out / name).is_file()

    embedding = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    size = {"width": 16, "height": 16, "num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np"}
    ours = FaceIDPipeline.from_pretrained(tiny_models.sd15, out / "ip-adapter-faceid.bin", device="cpu", progress=False)
    conditioning = ours.encode("a photo of a person", embedding)
    mine = ours(conditioning=conditioning, seed=1, **size).images

    theirs = StableDiffusionPipeline.from_pretrained(tiny_models.sd15, safety_checker=None)
    theirs.scheduler = type(ours.pipe.scheduler).from_config(ours.pipe.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_ip_adapter(str(out), subfolder="", weight_name="ip-adapter-faceid.bin", image_encoder_folder=None)
    theirs.set_ip_adapter_scale(1.0)
    id_embeds = torch.cat([torch.zeros_like(embedding), embedding])[:, None]  # (2, 1, 512): uncond, cond
    text = conditioning.pipe_kwargs
    other = theirs(
        prompt_embeds=text["prompt_embeds"],
        negative_prompt_embeds=text["negative_prompt_embeds"],
        ip_adapter_image_embeds=[id_embeds],
        generator=torch.Generator().manual_seed(1),
        **size,
    ).images
    print(f"\nmax |faceid - diffusers| = {np.abs(mine - other).max():.2e}")
    np.testing.assert_allclose(mine, other, atol=1e-4)


def _accelerate_launch(config: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/<config> ... -m faceid.cli train <args>`` on a free port."""
    import socket

    with socket.socket() as probe:  # a free port, so that a leftover run on the default one cannot collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / config),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port), "-m", "faceid.cli", "train", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env)
    _clear_stale_extension_locks(env)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def _clear_stale_extension_locks(env: dict[str, str], older_than_s: float = 900.0) -> None:
    """Remove torch extension build locks that a killed run left behind.

    DeepSpeed JIT-builds a communication op under torch's ``FileBaton`` lock file at every start; a process
    killed while holding it leaves the file, and every later start then waits on it forever. A build takes
    a few minutes, so a lock older than ``older_than_s`` has no live owner.
    """
    import time

    root = Path(env.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/*/lock"):
        if time.time() - lock.stat().st_mtime > older_than_s:
            lock.unlink(missing_ok=True)


def _launch_args(dataset, tiny_models, out, *extra) -> list[str]:
    return [
        "--base-model", str(tiny_models.sd15), "--dataset", str(dataset),
        "--output-dir", str(out), "--resolution", "16", "--train-batch-size", "2", "--lora-rank", "4",
        "--max-train-steps", "3", "--checkpointing-steps", "2", "--report-to", "none", *extra,
    ]  # fmt: skip


def test_two_process_training_with_accelerate_launch(dataset, tiny_models, tmp_path):
    """The shipped DDP config on 2 CPU processes (gloo): the main process counts 2, and every step averages
    both processes' batches, so the weights differ from a single process's."""
    out = tmp_path / "ddp"
    done = _accelerate_launch(
        "accelerate_ddp.yaml", _launch_args(dataset, tiny_models, out), {"ACCELERATE_USE_CPU": "true"}, tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps on 2 processes" in done.stdout  # printed once, by the main process
    assert (out / "checkpoint-2" / "adapter.safetensors").is_file()
    history = json.loads((out / "train_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    ddp = _trained_state(out)
    single = tmp_path / "single"
    Trainer(_config(dataset, tiny_models, single, train_batch_size=2, max_train_steps=3)).train()
    assert any(not torch.equal(ddp[g][k], _trained_state(single)[g][k]) for g in ddp for k in ddp[g])


def test_launch_that_accelerate_would_split_into_lone_processes_is_refused(dataset, tiny_models, tmp_path):
    """Without GPUs and without ACCELERATE_USE_CPU, accelerate starts 2 processes that each think they are alone."""
    done = _accelerate_launch("accelerate_ddp.yaml", _launch_args(dataset, tiny_models, tmp_path / "x"), {}, tmp_path)
    assert done.returncode != 0
    assert "ACCELERATE_USE_CPU=true" in done.stderr
    assert not (tmp_path / "x" / "ip-adapter-faceid.bin").exists()


PEOPLE = ("obama", "obama2", "biden")  # each photo counts as one person here: the stand-in has no identity


@pytest.fixture(scope="module")
def base_that_knows_the_people(dataset, tiny_models, tmp_path_factory):
    """The tiny SD1.5 model made to behave like a trained one, so that an identity has something to add.

    The random-weight tiny model (tiny_models.py) cannot show it: its VAE's posterior noise (std ~1 before
    scaling) swamps the image (std ~0.2), and its UNet denoises nothing, so no conditioning lowers the loss. Here
    (1) the VAE's posterior is made near-deterministic (log-variance bias -12, std 0.0025) and its scaling
    factor gives unit-variance latents, as SD's 0.18215 does; (2) the UNet (all of it) learns to draw each
    person when the prompt names them ("a photo of alice"), as SD draws what a prompt names. Adapter
    training then uses one caption for everyone, so only the face embedding can say who is in the picture.
    """
    import shutil

    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from faceid.data import FaceDataset

    base = tmp_path_factory.mktemp("base") / "sd15-tiny-trained"
    shutil.copytree(tiny_models.sd15, base)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    items = FaceDataset(dataset, resolution=16)
    pixels = torch.stack([items[i]["pixel_values"] for i in range(len(items))])
    names = {person: f"a photo of {name}" for person, name in zip(PEOPLE, ("alice", "bob", "carol"), strict=True)}
    captions = [names[rec["file_name"].rsplit("_", 1)[0]] for rec in items.records]
    with torch.no_grad():
        pipe.vae.quant_conv.bias[4:] = -12.0
        latents = pipe.vae.encode(pixels).latent_dist.mean
        pipe.vae.register_to_config(scaling_factor=1.0 / latents.std().item())
        latents = latents * pipe.vae.config.scaling_factor
        text = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    pipe.unet.train()
    for _ in range(300):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (len(latents),), generator=generator)
        loss = F.mse_loss(pipe.unet(scheduler.add_noise(latents, noise, t), t, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.unet.save_pretrained(base / "unet")
    pipe.vae.save_pretrained(base / "vae")
    return base


def test_training_teaches_the_adapter_to_use_the_identity(
    dataset, tiny_models, base_that_knows_the_people, tmp_path, capsys
):
    from faceid.data import FaceDataset
    from faceid.train import _collate

    items = FaceDataset(dataset, resolution=16)
    order = {
        person: [i for i, rec in enumerate(items.records) if rec["file_name"].startswith(person + "_")]
        for person in PEOPLE
    }
    # one photo of each person per batch; "shuffled" gives each image the next person's embedding
    batches = [_collate([items[order[p][j]] for p in PEOPLE]) for j in range(4)]

    def gaps(trainer) -> tuple[float, float, int]:
        pairs = [
            (trainer.identity_loss(batches, shuffle=False, seed=s), trainer.identity_loss(batches, True, s))
            for s in range(8)
        ]
        true, shuffled = (sum(p[k] for p in pairs) / len(pairs) for k in (0, 1))
        return true, shuffled, sum(t < s for t, s in pairs)

    base = str(base_that_knows_the_people)
    untrained = Trainer(_config(dataset, tiny_models, tmp_path / "untrained", base_model=base, max_train_steps=0))
    untrained.train()
    before = gaps(untrained)
    trainer = Trainer(_config(dataset, tiny_models, tmp_path / "learn", base_model=base, max_train_steps=100))
    trainer.train()
    after = gaps(trainer)
    losses = [h["loss"] for h in trainer.history]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    with capsys.disabled():
        print(f"\ntraining loss, mean of the first and the last 20 steps: {first:.4f} -> {last:.4f}")
        for label, (true, shuffled, wins) in (("before training", before), ("after 100 steps", after)):
            print(
                f"{label}: denoising loss with own identity {true:.4f}, shuffled {shuffled:.4f} "
                f"(shuffled {100 * (shuffled - true) / true:+.1f}%; own lower in {wins}/8 evaluations)"
            )
    # The loss falls: measured on the same images, noise and timesteps before and after (the per-step
    # training loss printed above is too noisy to assert on: every step draws new timesteps).
    assert after[0] < 0.97 * before[0]
    true, shuffled, wins = after
    assert true < shuffled and wins == 8
    assert shuffled - true > 3 * abs(before[1] - before[0])  # the gap comes from training


@pytest.fixture(scope="module")
def dataset_with_crops(dataset, tmp_path_factory, face_models_dir):
    from faceid.data import prepare_dataset, read_dataset_info
    from faceid.faces import FaceAnalyzer

    images = Path(read_dataset_info(dataset)["images_dir"])
    out = tmp_path_factory.mktemp("train-data-crops") / "dataset"
    prepare_dataset(images, out, lambda: FaceAnalyzer.from_dir(face_models_dir), with_crops=True, progress=False)
    return out


def test_plus_training_with_validation_and_tensorboard(
    dataset_with_crops, tiny_models, tmp_path, faces_dir, face_models_dir
):
    out = tmp_path / "plus"
    config = _config(
        dataset_with_crops, tiny_models, out, variant="plus", image_encoder=str(tiny_models.image_encoder),
        max_train_steps=2, validation_steps=2, validation_faces=[str(faces_dir / "obama.jpg")],
        validation_inference_steps=2, face_models=str(face_models_dir), report_to="tensorboard",
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.train()
    state = _trained_state(out)
    assert any(k.startswith("perceiver_resampler.") for k in state["image_proj"])
    assert (out / "validation" / "step-000002.png").is_file()
    logged = trainer.history[-1]  # validation ran at step 2: its figures join that step's record
    assert logged["step"] == 2 and 0.0 <= logged["face_detected"] <= 1.0
    assert logged["identity_gap"] == pytest.approx(logged["loss_shuffled_identity"] / logged["loss_own_identity"] - 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        tags = EventAccumulator(str(events)).Reload().Tags()
        scalars |= set(tags["scalars"])
        images |= set(tags["images"])
    assert {"train/loss", "validation/identity_gap", "validation/identity_similarity"} <= scalars
    assert "validation" in images
    with Image.open(out / "training.png") as plot:  # loss and identity gap, for people without TensorBoard
        assert plot.format == "PNG" and plot.height > plot.width * 0.8  # two panels


def test_portrait_and_sdxl_training_run(dataset, tiny_models, tmp_path):
    Trainer(_config(dataset, tiny_models, tmp_path / "portrait", variant="portrait", max_train_steps=2)).train()
    portrait = _trained_state(tmp_path / "portrait")
    assert not any("lora" in k for k in portrait["ip_adapter"])
    assert portrait["image_proj"]["proj.2.weight"].shape[0] == 16 * 64
    assert (tmp_path / "portrait" / "ip-adapter-faceid-portrait.safetensors").is_file()
    assert not list((tmp_path / "portrait").glob("*_lora.safetensors"))  # Portrait has no identity LoRA

    sdxl = tmp_path / "sdxl"
    Trainer(_config(dataset, tiny_models, sdxl, base_model=str(tiny_models.sdxl),
                    max_train_steps=2)).train()  # fmt: skip
    assert _trained_state(sdxl)["image_proj"]["norm.weight"].shape == (128,)


@pytest.mark.parametrize(
    ("variant", "shortcut", "stem"),
    [("faceid", None, "ip-adapter-faceid"), ("plus", None, "ip-adapter-faceid-plus"),
     ("plusv2", None, "ip-adapter-faceid-plusv2"), ("plus", True, "ip-adapter-faceid-plusv2"),
     ("portrait", None, "ip-adapter-faceid-portrait")],
)  # fmt: skip
def test_exports_are_named_so_that_they_load_as_what_was_trained(variant, shortcut, stem):
    """Plus and PlusV2 files hold the same tensors: the released names tell them apart, so the export is named
    like them, and a PlusV2 export loads with its shortcut on."""
    from faceid.train import export_name
    from faceid.variants import ARCHITECTURES, closest_architecture

    arch = ARCHITECTURES[variant]
    on = arch.shortcut if shortcut is None else shortcut
    assert export_name(arch.needs_clip, on, variant == "portrait") == stem
    if arch.needs_clip:  # how loading reads the file: Plus layout, told apart by its name
        loaded = closest_architecture(True, arch.tokens_per_face, True, name=f"{stem}.safetensors")
        assert loaded.shortcut == on

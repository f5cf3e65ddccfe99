"""``faceid serve`` promises only what it can run: the few-step presets (``--fast PRESET[=FILE]``), the tiny VAE
decoder, ControlNet kinds with their annotators and style adapters are stated at start, loaded with the model set
(an error at start when one cannot load, never inside a job), listed by ``GET /v1/models`` and the only ones a
request may ask for (422 at submit otherwise). On the tiny models, offline."""

from __future__ import annotations

import pytest
from test_fast import _lora_file
from test_serve import Recording, enroll, error, generate, make_client, wait_finished  # noqa: F401 (a fixture)
from test_serve_live import live_pipe  # noqa: F401 (a fixture: a pipeline with a tiny VAE)
from test_serve_modes import controlnet_dir  # noqa: F401 (a fixture)

from faceid import model_set
from faceid.errors import FaceIDError, MissingWeightsError
from faceid.pipeline import FaceIDPipeline
from faceid.service import ServeConfig
from faceid.service.capabilities import Capabilities
from faceid.service.models import pipeline_bytes

STEPS = {"num_inference_steps": 2}
LIMITS = {"max_steps": 100, "max_side": 2048, "max_images": 8, "max_batch": 4, "max_upload_bytes": 20 * 1024 * 1024,
          "max_photos": 10}  # fmt: skip


@pytest.fixture(scope="module")
def own_pipe(tiny_models, analyzer):
    """A pipeline of its own: the few-step LoRA a server loads stays on it."""
    return FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False, face_analyzer=analyzer
    )


@pytest.fixture
def no_downloads(monkeypatch):
    """Every Hub fetch of a pinned file fails (as offline) and is recorded."""
    fetched = []

    def fetch(file, *args, **kwargs):
        fetched.append(file)
        raise MissingWeightsError(f"{file.repo}/{file.filename} is not in the Hub cache and the Hub is offline")

    monkeypatch.setattr(model_set, "fetch", fetch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return fetched


def test_fast_and_decoder_the_server_lacks_are_refused_at_submit(make_client, faces_dir):  # noqa: F811
    client = make_client(start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    message = error(generate(client, identity, fast="hyper"), 422, "invalid_request", "fast", "'hyper'")
    assert "it has none" in message and "--fast hyper" in message, message
    error(generate(client, identity, decoder="tiny"), 422, "invalid_request", "decoder", "'tiny'", "--tiny-vae")
    error(generate(client, identity, tiny_vae="taesd"), 422, "invalid_request", "tiny_vae", "--tiny-vae")
    assert client.app.state.service.queue.depth == 0  # nothing was queued
    assert generate(client, identity, decoder="full", **STEPS).status_code == 202  # what it has is taken
    models = client.get("/v1/models").json()
    assert (models["fast"], models["decoders"], models["annotators"]) == ({}, ["full"], [])
    assert models["limits"] == LIMITS
    assert (models["controlnets"], models["style_adapters"], models["max_people"]) == ({}, {}, 6)  # the old keys


def test_a_fast_preset_from_a_file_is_loaded_at_start_listed_and_run(make_client, faces_dir, own_pipe, tmp_path,  # noqa: F811
                                                                     no_downloads):  # fmt: skip
    lora = _lora_file(own_pipe, "lcm", tmp_path)
    before = pipeline_bytes(own_pipe)
    loads = []
    real = own_pipe._load_fast_lora
    own_pipe._load_fast_lora = lambda *args: (loads.append(args[0]), real(*args))[1]
    try:
        client = make_client(pipeline=own_pipe, fast={"lcm": str(lora)}, max_steps=6)
        # loaded at start, from the file, counted in the worker's model memory
        assert loads == ["lcm"] and "fast-lcm" in own_pipe._fast_loras
        models = client.get("/v1/models").json()
        assert models["workers"][0]["memory"]["used_bytes"] == pipeline_bytes(own_pipe) > before
        assert models["fast"] == {
            "lcm": {"title": "LCM-LoRA", "families": ["SD1.5", "SDXL"], "num_inference_steps": 4,
                    "scheduler": "lcm", "guidance_scale": 1.0}
        }  # fmt: skip
        assert models["limits"]["max_steps"] == 6 and models["configured"] == {}
        identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
        response = generate(client, identity, fast="lcm", num_inference_steps=None)
        assert response.status_code == 202, response.text
        view = wait_finished(client, response.json()["id"])
        assert view["status"] == "done", view
        assert (view["settings"]["fast"], view["settings"]["num_inference_steps"]) == ("lcm", 4)
        # the job loaded nothing and fetched nothing
        assert loads == ["lcm"] and no_downloads == []
        message = error(generate(client, identity, fast="tcd"), 422, "invalid_request", "no 'tcd' preset")
        assert "it has lcm" in message and "--fast tcd" in message, message
    finally:
        del own_pipe._load_fast_lora


def test_a_fast_preset_that_cannot_load_is_an_error_at_start(make_client, own_pipe, tmp_path, no_downloads):  # noqa: F811
    with pytest.raises(FaceIDError, match=r"--fast lcm=.*missing\.safetensors: no such file"):
        ServeConfig(data_dir=tmp_path / "d", pipeline=own_pipe, fast={"lcm": str(tmp_path / "missing.safetensors")})
    with pytest.raises(FaceIDError, match="unknown few-step preset 'turbo'"):
        ServeConfig(data_dir=tmp_path / "d", pipeline=own_pipe, fast={"turbo": None})
    # the pinned Hub file, offline and not cached: the server does not start, and says what to give instead
    with pytest.raises(FaceIDError) as raised:
        make_client(pipeline=own_pipe, fast={"tcd": None})
    message = str(raised.value)
    assert "no worker could load the models" in message and "--fast tcd=FILE" in message, message
    assert "--fast-lora" not in message and [f.repo for f in no_downloads] == ["h1t/TCD-SD15-LoRA"]
    # a preset for no family this server serves
    with pytest.raises(FaceIDError, match="--fast lightning .* exists for SDXL only"):
        make_client(pipeline=own_pipe, fast={"lightning": None}, data_dir=tmp_path / "d2")


def test_serve_fast_flag(tmp_path, capsys):
    from faceid.cli import build_parser, main
    from faceid.cli.flags import settings_from_args
    from faceid.cli.serve import _fast_once

    args = build_parser().parse_args(["serve", "--fast", "lcm", "--fast", "tcd=./tcd.safetensors"])
    assert _fast_once(args.fast_presets) == {"lcm": None, "tcd": "./tcd.safetensors"}
    assert settings_from_args(args).fast is None  # the flag is the server's, not a default of the requests
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--fast", "turbo"])
    assert "PRESET or PRESET=FILE with PRESET one of lcm" in capsys.readouterr().err
    data = tmp_path / "d"
    assert main(["serve", "--data-dir", str(data), "--fast", f"lcm={tmp_path / 'nope.safetensors'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(data), "--fast", "lcm=a", "--fast", "lcm=b"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not data.exists()


def test_controlnets_and_their_annotators_load_at_start(make_client, faces_dir, controlnet_dir, monkeypatch, pipe):  # noqa: F811
    import faceid.control

    annotators = []

    def annotator_options(kind, device=None):  # OpenPose's network: a stand-in, recorded
        annotators.append(kind)
        return {"pose_model": object()} if kind == "pose" else {}

    monkeypatch.setattr(faceid.control, "annotator_options", annotator_options)
    loads = []
    recording = Recording(pipe)
    recording.load_controlnet = lambda source: (loads.append(source), pipe.load_controlnet(source))[1]
    client = make_client(pipeline=recording, controlnets={"canny": str(controlnet_dir), "pose": str(controlnet_dir)})
    # one ControlNet folder for two kinds: loaded once, at start, with the pose annotator
    assert loads == [str(controlnet_dir)] and sorted(annotators) == ["canny", "pose"]
    models = client.get("/v1/models").json()
    assert models["annotators"] == ["openpose"] and set(models["controlnets"]) == {"canny", "pose"}
    assert models["workers"][0]["memory"]["used_bytes"] > pipeline_bytes(pipe)  # the ControlNet counted
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    photo = client.post(
        "/v1/uploads", files={"image": ("obama.jpg", (faces_dir / "obama.jpg").read_bytes(), "image/jpeg")}
    ).json()["id"]
    view = wait_finished(
        client,
        generate(client, identity, controls=[{"kind": "canny", "image": photo}], **STEPS).json()["id"],
    )
    assert view["status"] == "done", view
    assert loads == [str(controlnet_dir)] and sorted(annotators) == ["canny", "pose"]  # nothing loaded by the job
    error(generate(client, identity, controls=[{"kind": "depth", "image": photo}]), 422, "invalid_request",
          "no ControlNet for 'depth'", "it has: canny, pose")  # fmt: skip


def test_a_controlnet_that_cannot_load_is_an_error_at_start(make_client, tmp_path):  # noqa: F811
    with pytest.raises(FaceIDError, match="could not load model") as raised:  # its config, read for its family
        make_client(controlnets={"canny": str(tmp_path / "no-such-controlnet")})
    assert "no-such-controlnet" in str(raised.value)
    with pytest.raises(FaceIDError, match="no worker could load the models") as raised:  # its weights, at load
        make_client(controlnets={"canny": {"SD1.5": str(tmp_path / "no-such-controlnet")}})
    assert "no-such-controlnet" in str(raised.value)


def test_the_tiny_decoder_with_a_tiny_vae(make_client, faces_dir, live_pipe):  # noqa: F811
    client = make_client(pipeline=live_pipe)
    assert client.get("/v1/models").json()["decoders"] == ["full", "tiny"]
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    view = wait_finished(client, generate(client, identity, decoder="tiny", **STEPS).json()["id"])
    assert view["status"] == "done" and view["settings"]["decoder"] == "tiny", view


def test_capabilities_state_what_the_configuration_loads(tmp_path, own_pipe):
    config = ServeConfig(
        data_dir=tmp_path, pipeline=own_pipe, controlnets={"pose": {"SD1.5": "x"}}, style_adapters={"s": "plain"}
    )
    caps = Capabilities.of(config, tiny_vae=False)  # on one machine and on every Ray replica alike
    assert (caps.modes[0], caps.controlnets, caps.style_adapters, caps.annotators, caps.decoders) == (
        "text-to-image", ("pose",), ("s",), ("openpose",), ("full",))  # fmt: skip
    assert "swap" in caps.modes and caps.max_people > 1
    assert Capabilities.of(config, tiny_vae=True).decoders == ("full", "tiny")

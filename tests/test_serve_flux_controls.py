"""The server's ControlNets on FLUX.1 model sets (``faceid serve --controlnet KIND=SOURCE``, one per kind and family):
the tests' tiny FLUX (``tiny_models.build_flux``) with a tiny InfiniteYou and a tiny PuLID-FLUX in their released
layouts, and a tiny FLUX ControlNet saved as a diffusers folder (``test_flux_controlnets.make_flux_controlnet``).

Checked: a ControlNet's family is read from its config (FLUX, SD1.5, SDXL; others and unreadable ones refused,
naming them); a served FLUX set lists its control kinds in ``GET /v1/models`` and a generation with ``controls``
(text-to-image beside InfiniteYou's InfuseNet, img2img with PuLID-FLUX) equals the same ``FaceIDPipeline`` call with
the same ``ControlInput`` within 1/255; a kind the set has no ControlNet for is a 422 naming the kinds it has; a
server with an SD1.5 and a FLUX ControlNet of the same kind (an ``--also-model`` catalog) loads each onto its own
family's model set only and runs both; a ControlNet of a family the server serves no model set of stops the start.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from face_helpers import face_photo
from PIL import Image
from test_flux_controlnets import make_flux_controlnet
from test_modes import make_controlnet
from test_serve import enroll, error, generate, make_client, wait_finished  # noqa: F401 (a fixture)

from faceid.control import make_control_image
from faceid.errors import FaceIDError
from faceid.faces import FaceAnalyzer
from faceid.families import family_of_controlnet
from faceid.modes import ControlInput, controlnet_family
from faceid.pipeline import FaceIDPipeline

SIZE = {"width": 32, "height": 32, "num_inference_steps": 2}
PROMPT = "a photo of a person in a garden"


@pytest.fixture(scope="module")
def analyzer(both_packs):
    """The server's face analysis as ``faceid serve`` loads it: buffalo_l's (the service adds the methods')."""
    return FaceAnalyzer.from_dir(both_packs)


@pytest.fixture(scope="module")
def method_dirs(infiniteyou_dir, pulid_flux_dir):
    """InfiniteYou (with the tiny IR-SE as facexlib's recognizer file) and PuLID-FLUX, in their releases' layouts."""
    return {"infiniteyou": str(infiniteyou_dir), "pulid-flux": str(pulid_flux_dir)}


@pytest.fixture(scope="module")
def flux(flux_dir, method_dirs, both_packs):
    return FaceIDPipeline.from_pretrained(
        flux_dir, None, methods=method_dirs, device="cpu", progress=False, face_models=both_packs
    )


@pytest.fixture(scope="module")
def flux_controlnet_dir(flux, tmp_path_factory):
    """A tiny FLUX ControlNet of the set's transformer (its output layers random, so that it acts), saved as
    ``--controlnet KIND=SOURCE`` names it."""
    folder = tmp_path_factory.mktemp("flux-controlnet")
    make_flux_controlnet(flux.pipe.transformer, seed=11).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_controlnet_dir(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-controlnet")
    make_controlnet(tiny_models.sd15, seed=1).save_pretrained(folder)
    return folder


def _picture(seed: int, size=(32, 32)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


def _upload(client, image: Image.Image) -> str:
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    response = client.post("/v1/uploads", files={"image": ("c.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _png(client, url) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB")).astype(float)


def _loaded_controlnets(client) -> dict[str, list[str]]:
    """What the worker loaded with each model set it holds: family -> the ControlNet sources attached."""
    models = client.app.state.service.workers[0].models
    attached = {e.family: models.get(e, None).attached for e in models.entries()}
    return {
        family: sorted(k for k in keys if not k.startswith(("method ", "style adapter ")))
        for family, keys in attached.items()
    }


# ---------------------------------------------------------------------- a ControlNet's family, from its config
def test_a_controlnets_family_is_read_from_its_config(flux_controlnet_dir, sd_controlnet_dir, tmp_path):
    assert controlnet_family(flux_controlnet_dir) == "FLUX.1" and controlnet_family(sd_controlnet_dir) == "SD1.5"
    rows = {
        "SDXL": {"_class_name": "ControlNetModel", "cross_attention_dim": 2048, "addition_embed_type": "text_time"},
        "SD1.5": {"_class_name": "ControlNetModel", "cross_attention_dim": 768},
        "FLUX.1": {"_class_name": "FluxControlNetModel", "joint_attention_dim": 4096},
    }
    for name, config in rows.items():
        assert family_of_controlnet(config).name == name
    for config in ({"_class_name": "ControlNetModel", "addition_embed_type": "text"},  # (Kandinsky's kind)
                   {"_class_name": "SD3ControlNetModel"}, {"_class_name": "UNet2DConditionModel"}):  # fmt: skip
        assert family_of_controlnet(config) is None
    other = tmp_path / "sd3"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "SD3ControlNetModel"}')
    with pytest.raises(FaceIDError, match="is a SD3ControlNetModel") as raised:
        controlnet_family(other)
    assert "FluxControlNetModel of FLUX.1" in str(raised.value) and str(other) in str(raised.value)
    (other / "config.json").write_text("{not json")
    with pytest.raises(FaceIDError, match="config.json does not read"):
        controlnet_family(other)


# ---------------------------------------------------------------------- a FLUX set with its ControlNets
def test_a_served_flux_set_runs_its_controlnets_as_the_pipeline(make_client, flux, method_dirs, flux_controlnet_dir,  # noqa: F811
                                                                 both_packs, faces_dir):  # fmt: skip
    source = str(flux_controlnet_dir)
    client = make_client(pipeline=flux, methods=method_dirs, face_models=str(both_packs),
                         controlnets={"image": source, "canny": source})  # fmt: skip
    models = client.get("/v1/models").json()
    (entry,) = models["catalog"]
    assert entry["family"] == "FLUX.1" and entry["controlnets"] == {"image": source, "canny": source}
    assert models["controlnets"] == {"image": source, "canny": source}
    assert _loaded_controlnets(client) == {"FLUX.1": [source]}  # one folder for two kinds: loaded once
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    control = _picture(5)
    upload = _upload(client, control)
    error(generate(client, identity, controls=[{"kind": "depth", "image": upload}], **SIZE), 422, "invalid_request",
          "no ControlNet for 'depth'", "it has: canny, image", "FLUX.1")  # fmt: skip
    assert client.app.state.service.queue.depth == 0

    net = flux.load_controlnet(source)  # what the server loaded: the same folder
    image = make_control_image("image", control, size=(SIZE["width"], SIZE["height"]))
    spec = {"kind": "image", "image": upload, "scale": 0.8, "window": [0.0, 0.5]}
    direct_control = ControlInput(image, net, 0.8, (0.0, 0.5))

    # text to image beside InfiniteYou's InfuseNet (the set's default method)
    view = wait_finished(
        client, generate(client, identity, prompt=PROMPT, controls=[spec], seed=3, **SIZE).json()["id"]
    )
    assert view["status"] == "done", view["error"]
    assert view["settings"]["method"] == "infiniteyou" and view["mode"] == "controlnet"
    direct = flux(PROMPT, face_photo("obama.jpg"), seed=3, control=[direct_control], output_type="np", **SIZE)
    served = _png(client, view["images"][0])
    assert np.abs(served - np.round(direct.images[0] * 255)).max() <= 1  # the PNG's rounding
    alone = flux(PROMPT, face_photo("obama.jpg"), seed=3, output_type="np", **SIZE).images[0]
    assert np.abs(served - np.round(alone * 255)).max() > 1  # the net acts
    assert np.array_equal(_png(client, view["control_images"][0]), np.asarray(image).astype(float))

    # img2img with PuLID-FLUX: the family's ControlNet img2img pipeline with the user's net
    init = _picture(6)
    init_id = _upload(client, init)
    job = generate(client, identity, prompt=PROMPT, method="pulid-flux", init_image=init_id, strength=0.6,
                   controls=[spec], seed=4, **SIZE)  # fmt: skip
    view = wait_finished(client, job.json()["id"])
    assert view["status"] == "done", view["error"]
    assert view["mode"] == "controlnet+img2img"
    direct = flux(PROMPT, face_photo("obama.jpg"), method="pulid-flux", init_image=init, strength=0.6,
                  control=[direct_control], seed=4, output_type="np", **SIZE)  # fmt: skip
    assert np.abs(_png(client, view["images"][0]) - np.round(direct.images[0] * 255)).max() <= 1


# ---------------------------------------------------------------------- one kind, two families
def test_one_kind_with_a_controlnet_per_family_loads_each_on_its_own(make_client, pipe, flux, flux_dir,  # noqa: F811
                                                                     method_dirs, flux_controlnet_dir,
                                                                     sd_controlnet_dir, both_packs, faces_dir):  # fmt: skip
    sd, fx = str(sd_controlnet_dir), str(flux_controlnet_dir)

    def loader(device, models):
        assert models.base_model == str(flux_dir)
        return flux

    client = make_client(pipeline=pipe, loader=loader, catalog=({}, {"base_model": str(flux_dir)}),
                         methods={"infiniteyou": method_dirs["infiniteyou"]}, face_models=str(both_packs),
                         controlnets={"image": [sd, fx], "canny": sd})  # fmt: skip
    models = client.get("/v1/models").json()
    assert [(e["family"], e["controlnets"]) for e in models["catalog"]] == [
        ("SD1.5", {"image": sd, "canny": sd}),
        ("FLUX.1", {"image": fx}),
    ]
    assert models["controlnets"] == {"image": f"SD1.5: {sd}; FLUX.1: {fx}", "canny": sd}
    assert _loaded_controlnets(client) == {"SD1.5": [sd]}  # the default set: its family's only
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    upload = _upload(client, _picture(7))
    flux_set = {"base_model": str(flux_dir), "prompt": PROMPT, "seed": 3, **SIZE}
    message = error(generate(client, identity, controls=[{"kind": "canny", "image": upload}], **flux_set), 422,
                    "invalid_request", "no ControlNet for 'canny'", "it has: image", "for SD1.5 model sets")  # fmt: skip
    assert "--controlnet canny=SOURCE, SOURCE a FLUX.1 ControlNet" in message

    controls = [{"kind": "image", "image": upload}]
    view = wait_finished(client, generate(client, identity, controls=controls, **flux_set).json()["id"])
    assert view["status"] == "done", view["error"]
    assert _loaded_controlnets(client) == {"SD1.5": [sd], "FLUX.1": [fx]}  # the FLUX set: the FLUX net only
    view = wait_finished(
        client, generate(client, identity, controls=controls, seed=3, num_inference_steps=2).json()["id"]
    )
    assert view["status"] == "done" and view["settings"]["method"] == "faceid", view  # the SD set: its SD net


def test_a_controlnet_of_a_family_the_server_does_not_serve_stops_the_start(make_client, flux_controlnet_dir):  # noqa: F811
    with pytest.raises(FaceIDError, match="is a FLUX.1 ControlNet, and this server serves SD1.5") as raised:
        make_client(controlnets={"canny": str(flux_controlnet_dir)})
    assert "--also-model" in str(raised.value)


def test_flux_controlnets_that_cannot_run_together_are_refused_at_submit(flux_controlnet_dir, tmp_path):
    """Each FLUX net's layout (blocks, XLabs-style) is read from its config at start: a request whose nets would
    not line up (depths differ without InfuseNet; an XLabs-style net beside it) is a 422 before it is queued, with
    the message the call itself gives."""
    import json
    from types import SimpleNamespace

    from faceid.service.capabilities import Capabilities, NotServed
    from faceid.service.config import check_controlnets
    from faceid.service.inputs import JobInputs
    from faceid.service.models import ModelEntry
    from faceid.settings import GenerationSettings

    base = json.loads((flux_controlnet_dir / "config.json").read_text())

    def net(name: str, **changes) -> str:  # the config is all the start reads of it
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, **changes}))
        return str(folder)

    nets = {"canny": str(flux_controlnet_dir), "depth": net("deeper", num_layers=base["num_layers"] + 1),
            "pose": net("xlabs", conditioning_embedding_channels=16), "image": net("same")}  # fmt: skip
    config = SimpleNamespace(controlnets=check_controlnets(nets), fast={}, style_adapters={}, methods={})
    caps = Capabilities.of(config, tiny_vae=False)
    entry = ModelEntry(0, GenerationSettings(base_model="flux"), "FLUX.1")

    def check(method: str, *kinds: str) -> None:
        inputs = JobInputs(controls=[{"kind": kind, "image": "u"} for kind in kinds])
        caps.check_family(GenerationSettings(method=method), inputs, entry)

    check("pulid-flux", "canny", "image")  # the same architecture: summed entry by entry
    check("infiniteyou", "canny", "depth")  # beside InfuseNet any depths (summed per block)
    with pytest.raises(NotServed, match="controls: these FLUX ControlNets differ in depth"):
        check("pulid-flux", "canny", "depth")
    with pytest.raises(NotServed, match=r"controls\[1\] is an XLabs-style FLUX ControlNet.*InfuseNet"):
        check("infiniteyou", "canny", "pose")

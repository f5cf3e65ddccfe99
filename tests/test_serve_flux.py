"""FLUX.1 model sets in ``faceid serve``: the tests' tiny FLUX (``tiny_models.build_flux``) without a FaceID adapter,
with a tiny InfiniteYou in the released layout (``tiny_models.build_infiniteyou``) and a tiny facexlib IR-SE
recognizer beside it, and stand-in face models of both insightface packs.

Checked: a FLUX set as the server's model set and as a second one (``--also-model``): ``GET /v1/models`` lists it
(family, FLUX.1-dev's defaults, no FaceID adapter, its default method, InfiniteYou with its licences, FLUX.1 [dev]'s
non-commercial one among them) and counts its memory; enrollment keeps InfiniteYou's embedding (the IR-SE50 of the
aligned crop, ``irse50`` among the recognizers); a generation of an enrolled identity over /v1 (no method named: the
set's own) equals the same pipeline call on the photo, without analysing or embedding the photo again, with a kps
upload too; what a FLUX set cannot do is refused at submit (422, naming why: negative prompt, FaceID, few-step
presets, style adapters, ControlNets, several people, swap, the tiny VAE, samplers), as is an identity enrolled
before InfiniteYou; ``faceid serve`` loads a FLUX set with its method and memory options, and refuses what cannot
start (no method for it, the memory options without a FLUX set, no IR-SE50 file) in one line before loading.
"""

from __future__ import annotations

import shutil
from io import BytesIO

import numpy as np
import pytest
from face_helpers import face_photo
from PIL import Image
from test_serve import enroll, error, generate, make_client, wait_finished  # noqa: F401 (a fixture)
from test_webapp import WAIT, browser, loaded_images, make_server, screenshot, set_value  # noqa: F401 (fixtures)

from faceid.cli import main
from faceid.faces import FaceAnalyzer
from faceid.faces.irse50 import IRSE50_FILE, IRSE50_KEY
from faceid.pipeline import FaceIDPipeline
from faceid.service.models import modules_bytes, pipeline_modules

SIZE = {"width": 32, "height": 32, "num_inference_steps": 2}
PROMPT = "a photo of a person in a garden"


@pytest.fixture(scope="module")
def analyzer(both_packs):
    """The server's face analysis as ``faceid serve`` loads it: buffalo_l's (the service adds the method's)."""
    return FaceAnalyzer.from_dir(both_packs)


@pytest.fixture(scope="module")
def flux(flux_dir, infiniteyou_dir, both_packs):
    return FaceIDPipeline.from_pretrained(
        flux_dir, None, methods={"infiniteyou": infiniteyou_dir}, device="cpu", progress=False, face_models=both_packs
    )


@pytest.fixture
def serving(make_client, flux, infiniteyou_dir, both_packs):  # noqa: F811
    """``serving(**config)``: a client of a server whose model set is the tiny FLUX with InfiniteYou."""

    def make(**options):
        return make_client(pipeline=flux, methods={"infiniteyou": str(infiniteyou_dir)}, face_models=str(both_packs),
                           **options)  # fmt: skip

    return make


def _png(client, url) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB")).astype(float)


def _direct(pipe, **kwargs) -> np.ndarray:
    return np.round(pipe(PROMPT, face_photo("obama.jpg"), seed=3, output_type="np", **SIZE, **kwargs).images[0] * 255)


def test_a_flux_model_set_served_lists_enrolls_and_generates_as_the_pipeline(serving, flux, faces_dir):
    client = serving()
    models = client.get("/v1/models").json()
    (entry,) = models["catalog"]
    assert entry["family"] == "FLUX.1" and entry["faceid_adapter"] is False and entry["negative_prompt"] is False
    assert entry["default_method"] == "infiniteyou" and entry.get("adapter") is None
    assert entry["defaults"] == {"width": 1024, "height": 1024, "num_inference_steps": 28, "guidance_scale": 3.5}
    (method,) = entry["methods"]  # no faceid: the set has no FaceID adapter
    assert method["name"] == "infiniteyou" and method["defaults"] == {"scale": 1.0}
    assert "FLUX.1 [dev] Non-Commercial License" in method["licence"] and method["commercial"] is False
    worker = models["workers"][0]
    assert worker["family"] == "FLUX.1" and worker["variant"] is None and worker["default_method"] == "infiniteyou"
    loaded = flux.loaded_method("infiniteyou")
    expected = modules_bytes([*pipeline_modules(flux), loaded.image_proj, loaded.infusenet, loaded.recognizer])
    assert worker["memory"]["used_bytes"] == expected > modules_bytes(pipeline_modules(flux))
    assert models["defaults"]["method"] == "infiniteyou" and models["defaults"]["negative_prompt"] == ""

    # enrollment keeps InfiniteYou's embedding: the IR-SE50 of the aligned crop
    response = enroll(client, faces_dir, "obama.jpg")
    assert response.status_code == 201, response.text
    identity = response.json()["id"]
    service = client.app.state.service
    (row,) = service.identity(identity, "").faces
    assert row.recognizers == ["antelopev2", "buffalo_l", IRSE50_KEY]
    (stored,) = service.enroller.faces(service.identity(identity, ""))
    kept = stored.raw_embeddings[IRSE50_KEY]
    assert np.abs(kept - loaded.recognizer.embed(stored.aligned)).max() <= 1e-5

    # a generation naming no method: the set's own, equal to the pipeline's call on the photo
    calls = []
    real_analyze, real_embed = flux.face_analyzer.analyze, loaded.recognizer.embed
    flux.face_analyzer.analyze = lambda *a, **k: (calls.append("analyze"), real_analyze(*a, **k))[1]
    loaded.recognizer.embed = lambda *a, **k: (calls.append("embed"), real_embed(*a, **k))[1]
    try:
        view = wait_finished(client, generate(client, identity, prompt=PROMPT, seed=3, **SIZE).json()["id"])
    finally:
        del flux.face_analyzer.analyze, loaded.recognizer.embed
    assert view["status"] == "done", view
    assert calls == []  # the stored face and its stored embedding, nothing analysed or embedded again
    settings = view["settings"]
    assert (settings["method"], settings["scale"], settings["negative_prompt"]) == ("infiniteyou", 1.0, "")
    assert "combine" not in settings and "lora_scale" not in settings and "adapter" not in settings
    served = _png(client, view["images"][0])
    difference = np.abs(served - _direct(flux)).max()
    assert difference <= 1, difference  # the PNG's rounding

    # a kps upload: InfuseNet follows that face's keypoints, as the pipeline's kps=
    biden = (faces_dir / "biden.jpg").read_bytes()
    kps = client.post("/v1/uploads", files={"image": ("biden.jpg", biden, "image/jpeg")}).json()["id"]
    portrait = {**SIZE, "width": 96, "height": 160}  # a frame the fitted photo's face is found in
    view = wait_finished(client, generate(client, identity, prompt=PROMPT, kps=kps, seed=3, scale=0.7,
                                          **portrait).json()["id"])  # fmt: skip
    assert view["status"] == "done", view["error"]
    with_kps = _png(client, view["images"][0])
    direct = flux(PROMPT, face_photo("obama.jpg"), kps=face_photo("biden.jpg"), scale=0.7, seed=3, output_type="np",
                  **portrait)  # fmt: skip
    assert np.abs(with_kps - np.round(direct.images[0] * 255)).max() <= 1
    black = flux(PROMPT, face_photo("obama.jpg"), scale=0.7, seed=3, output_type="np", **portrait)
    assert np.abs(with_kps - np.round(black.images[0] * 255)).max() > 1  # the keypoints act


def test_what_a_flux_model_set_cannot_do_is_refused_at_submit(serving, make_client, flux, faces_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    plain = make_client(pipeline=flux, data_dir=data)  # InfiniteYou's weights on the pipeline, not served
    old = enroll(plain, faces_dir, "obama.jpg").json()["id"]
    assert plain.get("/v1/models").json()["catalog"][0]["methods"] == []
    error(generate(plain, old, **SIZE), 422, "invalid_request", "no 'infiniteyou' weights loaded",
          "--method-weights infiniteyou=FOLDER")  # fmt: skip
    make_client.close(plain)

    client = serving(data_dir=data)  # the same data, now with InfiniteYou: the identity predates it
    message = error(generate(client, old, **SIZE), 422, "invalid_request", f"identity {old}", IRSE50_KEY,
                    "enroll its photos again")  # fmt: skip
    assert "buffalo_l only" in message, message
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    upload = client.post("/v1/uploads", files={"image": ("o.jpg", (faces_dir / "obama.jpg").read_bytes(),
                                                         "image/jpeg")}).json()["id"]  # fmt: skip
    refused = {
        "negative_prompt": {"negative_prompt": "blurry"},
        "method 'faceid'": {"method": "faceid"},
        "fast": {"fast": "lcm"},
        "style": {"style": [{"image": upload, "adapter": "plus-face"}]},
        "controls": {"controls": [{"kind": "canny", "image": upload}]},
        "decoder 'tiny'": {"decoder": "tiny"},
        "scheduler": {"scheduler": "euler"},
    }
    for why, fields in refused.items():
        message = error(generate(client, identity, **SIZE, **fields), 422, "invalid_request", why, "FLUX.1")
        assert "identity_id" not in message
    people = {"prompt": PROMPT, **SIZE, "people": [identity, identity]}
    error(client.post("/v1/generations", json=people), 422, "invalid_request", "people", "FLUX.1")
    swap = {"prompt": PROMPT, "num_inference_steps": 2, "identity_id": identity, "swap": {"target": upload}}
    error(client.post("/v1/generations", json=swap), 422, "invalid_request", "swap", "FLUX.1")
    error(generate(client, identity, identitynet_scale=0.5, **SIZE), 422, "invalid_request", "identitynet_scale",
          "'infiniteyou'")  # fmt: skip
    assert client.app.state.service.queue.depth == 0
    view = wait_finished(client, generate(client, identity, negative_prompt="", seed=1, **SIZE).json()["id"])
    assert view["status"] == "done", view  # an empty negative prompt is none


def test_a_flux_model_set_beside_a_stable_diffusion_one(make_client, pipe, flux, flux_dir, infiniteyou_dir,  # noqa: F811
                                                        both_packs, faces_dir):  # fmt: skip
    loads = []

    def loader(device, models):
        loads.append(models.base_model)
        assert models.base_model == str(flux_dir) and models.adapter is None
        return flux

    client = make_client(pipeline=pipe, loader=loader, catalog=({}, {"base_model": str(flux_dir)}),
                         methods={"infiniteyou": str(infiniteyou_dir)}, face_models=str(both_packs))  # fmt: skip
    assert "infiniteyou" not in pipe.methods  # the SD1.5 set does not get it
    catalog = client.get("/v1/models").json()["catalog"]
    assert [(e["family"], e["default_method"], [m["name"] for m in e["methods"]]) for e in catalog] == [
        ("SD1.5", "faceid", ["faceid"]),
        ("FLUX.1", "infiniteyou", ["infiniteyou"]),
    ]
    assert catalog[1]["loaded_on"] == [] and catalog[1]["faceid_adapter"] is False and loads == []
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    error(generate(client, identity, method="infiniteyou", **SIZE), 422, "invalid_request", "runs on FLUX.1",
          str(flux_dir))  # fmt: skip
    error(generate(client, identity, base_model=str(flux_dir), negative_prompt="blurry", **SIZE), 422,
          "invalid_request", "negative_prompt")  # fmt: skip
    job = generate(client, identity, base_model=str(flux_dir), prompt=PROMPT, seed=3, **SIZE)
    assert job.status_code == 202, job.text
    view = wait_finished(client, job.json()["id"])
    assert view["status"] == "done", view
    assert loads == [str(flux_dir)]
    settings = view["settings"]
    assert (settings["method"], settings["negative_prompt"], settings["scale"]) == ("infiniteyou", "", 1.0)
    assert np.abs(_png(client, view["images"][0]) - _direct(flux)).max() <= 1
    # the SD1.5 set still runs FaceID with its defaults
    view = wait_finished(client, generate(client, identity, seed=3, num_inference_steps=2).json()["id"])
    assert view["status"] == "done" and view["settings"]["method"] == "faceid", view


def test_faceid_serve_loads_a_flux_model_set_and_refuses_what_cannot_start(flux_dir, infiniteyou_dir, both_packs,
                                                                           tiny_models, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    import uvicorn

    import faceid.service

    started = []
    monkeypatch.setattr(faceid.service, "create_app", lambda config: started.append(config) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    base = ["serve", "--data-dir", str(tmp_path / "d"), "--face-models", str(both_packs), "--device", "cpu"]
    flux_set = ["--base-model", str(flux_dir), "--method-weights", f"infiniteyou={infiniteyou_dir}"]
    assert main([*base, *flux_set, "--quantize", "int8"]) == 0, capsys.readouterr().err
    (config,) = started
    assert config.pipeline.family == "FLUX.1" and config.pipeline.adapter is None and config.pipeline.quantize == "int8"
    assert list(config.pipeline.methods) == ["infiniteyou"] and config.models["quantize"] == "int8"
    assert IRSE50_KEY in config.analyzer.extra_recognizers  # enrollment embeds for InfiniteYou

    def refused(*flags, said):
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err

    refused("--base-model", str(flux_dir), said="give --method-weights NAME=FOLDER")
    refused("--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid")), "--offload",
            "model", said="--offload and --quantize are the memory options of FLUX.1 model sets")  # fmt: skip
    bare = tmp_path / "InfiniteYou"
    shutil.copytree(infiniteyou_dir, bare, ignore=shutil.ignore_patterns(IRSE50_FILE))
    refused("--base-model", str(flux_dir), "--method-weights", f"infiniteyou={bare}", said=IRSE50_FILE)
    assert len(started) == 1


def test_pulid_flux_served_with_true_cfg_equals_the_pipeline(make_client, flux_dir, both_packs, faces_dir,  # noqa: F811
                                                              tmp_path_factory):  # fmt: skip
    from tiny_models import build_pulid_flux

    folder = build_pulid_flux(flux_dir, tmp_path_factory.mktemp("pulid-flux") / "PuLID", seed=3)
    pulid = FaceIDPipeline.from_pretrained(
        flux_dir, None, methods={"pulid-flux": folder}, device="cpu", progress=False, face_models=both_packs
    )
    client = make_client(pipeline=pulid, methods={"pulid-flux": str(folder)}, face_models=str(both_packs))
    (entry,) = client.get("/v1/models").json()["catalog"]
    assert entry["default_method"] == "pulid-flux" and [m["name"] for m in entry["methods"]] == ["pulid-flux"]
    assert "FLUX.1 [dev] Non-Commercial License" in entry["methods"][0]["licence"]
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    service = client.app.state.service
    (stored,) = service.enroller.faces(service.identity(identity, ""))
    assert "antelopev2" in stored.raw_embeddings and stored.crop_ffhq is not None  # what PuLID reads, kept
    error(generate(client, identity, negative_prompt="blurry", **SIZE), 422, "invalid_request", "negative_prompt",
          "true_cfg")  # fmt: skip
    error(generate(client, identity, method="pulid-flux", kps="x", **SIZE), 422, "invalid_request", "kps")
    error(generate(client, identity, pulid_ortho="v1", **SIZE), 422, "invalid_request", "pulid_ortho (PuLID's)")
    assert entry["methods"][0]["defaults"] == {"scale": 1.0, "true_cfg_start": 1}  # the authors' app_flux
    view = wait_finished(client, generate(client, identity, prompt=PROMPT, true_cfg=2.0, negative_prompt="blurry",
                                          true_cfg_start=0, seed=3, **SIZE).json()["id"])  # fmt: skip
    assert view["status"] == "done", view["error"]
    settings = view["settings"]
    assert (settings["method"], settings["true_cfg"], settings["true_cfg_start"], settings["negative_prompt"]) == (
        "pulid-flux", 2.0, 0, "blurry")  # fmt: skip
    direct = pulid(PROMPT, face_photo("obama.jpg"), true_cfg=2.0, negative_prompt="blurry", true_cfg_start=0, seed=3,
                   output_type="np", **SIZE).images[0]  # fmt: skip
    difference = np.abs(_png(client, view["images"][0]) - np.round(direct * 255)).max()
    assert difference <= 1, difference


# ---------------------------------------------------------------------- the web app (chromium, as test_webapp)
def test_web_app_shows_a_flux_model_set_with_its_method_and_licence(make_server, browser, flux, infiniteyou_dir,  # noqa: F811
                                                                     both_packs, faces_dir, tmp_path):  # fmt: skip
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = make_server(pipeline=flux, methods={"infiniteyou": str(infiniteyou_dir)}, face_models=str(both_packs))
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "method-box").is_displayed())  # one method, not FaceID: shown
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#method option")]
    assert options == ["InfiniteYou-FLUX v1.0"], options
    licence = browser.find_element(By.ID, "method-licence").text
    assert "FLUX.1 [dev] Non-Commercial License" in licence and "not for commercial use" in licence, licence
    assert not browser.find_element(By.ID, "negative-field").is_displayed()  # embedded guidance: no negative prompt
    disabled = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#mode option:disabled")]
    assert "swap" in disabled and "img2img" not in disabled, disabled

    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    for field, value in {"steps": 2, "width": 32, "height": 32, "seed": 7, "count": 1}.items():
        set_value(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1)
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "method infiniteyou" in caption, caption
    screenshot(browser, tmp_path, "flux-infiniteyou")
    (made,) = httpx.get(f"{url}/v1/generations").json()["generations"]
    assert made["settings"]["method"] == "infiniteyou" and made["settings"]["negative_prompt"] == ""

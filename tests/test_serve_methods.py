"""Identity methods through ``faceid serve`` (``--method-weights NAME=FOLDER``, ``ServeConfig.methods``): InstantID
on the tests' tiny SDXL with a tiny InstantID in the released layout (``tiny_models.build_instantid``) and stand-in
face models of both insightface packs.

Checked: the worker loads the method onto the model set at start (counted in its memory) and ``GET /v1/models``
lists each model set's methods with their licence and defaults; enrollment keeps the embedding of every recognizer
(buffalo_l and antelopev2) and the photo size; an InstantID generation over the API for an enrolled identity
equals the same call through ``FaceIDPipeline`` on the photo (same seed), without analysing the photo again, so
the stored embedding and keypoints are the right ones; the refusals (a method not loaded, an identity enrolled
before the method was, a method on a model set of the wrong family, a missing folder or antelopev2 pack at start,
on the command line too); face files of an earlier version still read. PuLID: the menu lists it (with the
authors' num_zero and ortho), enrollment keeps its FFHQ-aligned crop, and a generation for an enrolled identity equals
the pipeline call on the photo, with its options too (pulid_num_zero/pulid_ortho, and the A1111 unit's pulid_mode).
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from conftest import load_tiny_sdxl
from face_helpers import face_photo, make_test_face_models_dir
from PIL import Image
from test_serve import enroll, error, generate, make_client, wait_finished  # noqa: F401 (a fixture)
from test_webapp import WAIT, browser, loaded_images, make_server, screenshot, set_value  # noqa: F401 (fixtures)

from faceid.cli import main
from faceid.errors import FaceIDError, MissingWeightsError
from faceid.faces import FaceAnalyzer
from faceid.service import ServeConfig
from faceid.service.capabilities import Capabilities, NotServed, check_methods
from faceid.service.models import ModelEntry, modules_bytes, pipeline_modules
from faceid.service.store import IdentityFace, face_recognizers
from faceid.settings import GenerationSettings

SIZE = {"width": 48, "height": 32, "num_inference_steps": 2}
PROMPT = "a photo of a person in a garden"


@pytest.fixture(scope="module")
def analyzer(both_packs):
    """The server's face analysis as ``faceid serve`` loads it: buffalo_l's (the service adds a method's pack)."""
    return FaceAnalyzer.from_dir(both_packs)


@pytest.fixture(scope="module")
def sdxl(tiny_models, both_packs):
    """A tiny SDXL model set without InstantID: the server's worker loads it (``Worker.equip``)."""
    return load_tiny_sdxl(tiny_models, both_packs)


@pytest.fixture
def serving(make_client, sdxl, instantid_dir, both_packs):  # noqa: F811
    """``serving(**config)``: a client of a server on the tiny SDXL that loads InstantID."""

    def make(**options):
        return make_client(pipeline=sdxl, methods={"instantid": str(instantid_dir)}, face_models=str(both_packs),
                           **options)  # fmt: skip

    return make


def _png(client, url) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB"))


def test_an_instantid_generation_for_an_enrolled_identity_equals_the_pipeline_call(serving, sdxl, faces_dir):
    client = serving()
    assert "instantid" in sdxl.methods  # loaded by the worker at start
    models = client.get("/v1/models").json()
    (entry,) = models["catalog"]
    assert [m["name"] for m in entry["methods"]] == ["faceid", "instantid"]
    instantid = entry["methods"][1]
    assert instantid["defaults"] == {"scale": 0.8, "identitynet_scale": 0.8}
    assert instantid["face_pack"] == "antelopev2" and "Apache-2.0" in instantid["licence"]
    assert instantid["commercial"] is False  # antelopev2 is non-commercial
    loaded = sdxl.loaded_method("instantid")
    expected = modules_bytes([*pipeline_modules(sdxl), loaded.resampler, loaded.identitynet])
    assert models["workers"][0]["memory"]["used_bytes"] == expected > modules_bytes(pipeline_modules(sdxl))
    assert models["configured"] == {}  # (what faceid serve states; a ServeConfig of its own states nothing)

    response = enroll(client, faces_dir, "obama.jpg")
    assert response.status_code == 201, response.text
    identity = response.json()["id"]
    service = client.app.state.service
    (row,) = service.identity(identity, "").faces
    assert row.recognizers == ["antelopev2", "buffalo_l"]
    stored = service.enroller.faces(service.identity(identity, ""))[0]
    assert set(stored.raw_embeddings) == {"antelopev2", "buffalo_l"} and stored.image_size is not None

    analysed = []
    real = sdxl.face_analyzer.analyze
    sdxl.face_analyzer.analyze = lambda *a, **k: (analysed.append(1), real(*a, **k))[1]
    try:
        job = generate(client, identity, prompt=PROMPT, method="instantid", identitynet_scale=0.6, seed=3, **SIZE)
        assert job.status_code == 202, job.text
        view = wait_finished(client, job.json()["id"])
    finally:
        del sdxl.face_analyzer.analyze
    assert view["status"] == "done", view
    assert analysed == []  # the stored face, not the photo analysed again
    settings = view["settings"]
    assert (settings["method"], settings["scale"], settings["identitynet_scale"]) == ("instantid", 0.8, 0.6)
    assert "combine" not in settings and "lora_scale" not in settings  # FaceID's knobs are not this call's
    served = _png(client, view["images"][0])

    direct = sdxl(PROMPT, face_photo("obama.jpg"), method="instantid", identitynet_scale=0.6, seed=3,
                  output_type="np", **SIZE)  # fmt: skip
    mine = np.round(direct.images[0] * 255)
    assert np.abs(served.astype(float) - mine).max() <= 1  # the PNG's rounding
    other = sdxl(PROMPT, face_photo("obama.jpg"), method="instantid", identitynet_scale=0.6, seed=3,
                 kps=face_photo("biden.jpg"), output_type="np", **SIZE)  # fmt: skip
    assert np.abs(served.astype(float) - np.round(other.images[0] * 255)).max() > 1  # the keypoints matter

    # A FaceID generation on the same server still runs, with FaceID's defaults.
    view = wait_finished(client, generate(client, identity, seed=3, **SIZE).json()["id"])
    assert view["status"] == "done" and view["settings"]["method"] == "faceid" and "combine" in view["settings"]


def test_the_keypoint_photo_and_the_client_protocols_name_the_method(serving, sdxl, faces_dir):
    """``kps`` (an upload: the face IdentityNet follows), OpenAI's ``method`` (extra_body) and A1111's InstantID units
    (``instant_id_face_embedding`` + ``instant_id_face_keypoints``) all reach the same InstantID call."""
    import base64
    import json

    from test_serve_openai import client_for

    client = serving(api_keys=("k",))
    headers = {"Authorization": "Bearer k"}
    identity = enroll(client, faces_dir, "obama.jpg", headers=headers, name="obama").json()["id"]
    biden = (faces_dir / "biden.jpg").read_bytes()
    kps = client.post("/v1/uploads", files={"image": ("biden.jpg", biden, "image/jpeg")}, headers=headers).json()["id"]
    view = wait_finished(client, generate(client, identity, headers, prompt=PROMPT, method="instantid", kps=kps,
                                          seed=3, **SIZE).json()["id"], headers)  # fmt: skip
    assert view["status"] == "done", view
    served = np.asarray(Image.open(BytesIO(client.get(view["images"][0], headers=headers).content)).convert("RGB"))
    direct = sdxl(PROMPT, face_photo("obama.jpg"), method="instantid", kps=face_photo("biden.jpg"), seed=3,
                  output_type="np", **SIZE).images[0]  # fmt: skip
    assert np.abs(served.astype(float) - np.round(direct * 255)).max() <= 1
    error(generate(client, identity, headers, prompt=PROMPT, kps=kps, **SIZE), 422, "invalid_request", "kps",
          "instantid")  # fmt: skip

    # OpenAI: the method in extra_body (a field of faceid's own); its jobs are /v1 jobs
    made = client_for(client, "k").images.generate(model="obama", prompt=PROMPT, size="48x32", response_format=
                                                  "b64_json", extra_body={"method": "instantid"})  # fmt: skip
    assert len(made.data) == 1
    listed = client.get("/v1/generations", headers=headers).json()["generations"]
    assert listed[0]["settings"]["method"] == "instantid"

    # A1111: the ControlNet extension's two InstantID units (the person's photo, the keypoint photo and its weight)
    photo = base64.b64encode((faces_dir / "obama.jpg").read_bytes()).decode()
    pose = base64.b64encode(biden).decode()
    units = [
        {"module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl", "image": photo, "weight": 0.8},
        {"module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl", "image": pose, "weight": 0.6},
    ]
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "width": 48, "height": 32,
            "alwayson_scripts": {"ControlNet": {"args": units}}}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    settings = client.get("/v1/generations", headers=headers).json()["generations"][0]["settings"]
    assert (settings["method"], settings["scale"], settings["identitynet_scale"]) == ("instantid", 0.8, 0.6)
    a1111 = np.asarray(Image.open(BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
    expected = sdxl(PROMPT, face_photo("obama.jpg"), method="instantid", kps=face_photo("biden.jpg"), seed=3,
                    identitynet_scale=0.6, output_type="np", **SIZE).images[0]  # fmt: skip
    assert np.abs(a1111.astype(float) - np.round(expected * 255)).max() <= 1
    assert json.loads(answer.json()["info"])["all_seeds"] == [3]
    mixed = [units[0] | {"module": "ip-adapter_face_id"}, units[1]]
    refused = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": mixed}}},
                          headers=headers)  # fmt: skip
    assert refused.status_code == 422 and "several identity methods" in refused.json()["detail"], refused.text


def test_a_pulid_generation_for_an_enrolled_identity_equals_the_pipeline_call(make_client, sdxl, pulid_dir,  # noqa: F811
                                                                              both_packs, faces_dir):  # fmt: skip
    client = make_client(pipeline=sdxl, methods={"pulid": str(pulid_dir)}, face_models=str(both_packs))
    (entry,) = client.get("/v1/models").json()["catalog"]
    (pulid,) = [m for m in entry["methods"] if m["name"] == "pulid"]  # the menu lists what is loaded
    assert pulid["defaults"] == {"scale": 0.8, "pulid_num_zero": 20, "pulid_ortho": "v2"}  # the authors' app_v1_1
    assert pulid["face_pack"] == "antelopev2"
    response = enroll(client, faces_dir, "obama.jpg")
    assert response.status_code == 201, response.text
    identity = response.json()["id"]
    service = client.app.state.service
    stored = service.enroller.faces(service.identity(identity, ""))[0]
    assert stored.crop_ffhq is not None and stored.crop_ffhq.shape == (512, 512, 3)  # PuLID's crop, kept
    job = generate(client, identity, prompt=PROMPT, method="pulid", seed=3, **SIZE)
    assert job.status_code == 202, job.text
    view = wait_finished(client, job.json()["id"])
    assert view["status"] == "done", view
    assert (view["settings"]["method"], view["settings"]["scale"]) == ("pulid", 0.8)
    assert (view["settings"]["pulid_num_zero"], view["settings"]["pulid_ortho"]) == (20, "v2")
    direct = sdxl(PROMPT, face_photo("obama.jpg"), method="pulid", seed=3, output_type="np", **SIZE)
    assert np.abs(_png(client, view["images"][0]).astype(float) - np.round(direct.images[0] * 255)).max() <= 1

    # PuLID's options travel with the job (and are refused with another method at submit) ...
    error(generate(client, identity, pulid_num_zero=8, **SIZE), 422, "invalid_request", "pulid_num_zero (PuLID's)")
    options = {"pulid_num_zero": 0, "pulid_ortho": "off"}
    view = wait_finished(client, generate(client, identity, prompt=PROMPT, method="pulid", seed=3, **options,
                                          **SIZE).json()["id"])  # fmt: skip
    assert view["status"] == "done" and view["settings"]["pulid_ortho"] == "off", view
    direct = sdxl(PROMPT, face_photo("obama.jpg"), method="pulid", seed=3, output_type="np", **options, **SIZE)
    assert np.abs(_png(client, view["images"][0]).astype(float) - np.round(direct.images[0] * 255)).max() <= 1

    # ... and the A1111 ControlNet extension's PuLID unit's pulid_mode is its num_zero and ortho
    import base64

    unit = {"module": "ip-adapter_pulid", "image": base64.b64encode((faces_dir / "obama.jpg").read_bytes()).decode(),
            "weight": 0.8, "pulid_mode": "Extremely style"}  # fmt: skip
    body = {"prompt": PROMPT, "seed": 3, "steps": 2, "width": 48, "height": 32,
            "alwayson_scripts": {"ControlNet": {"args": [unit]}}}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    settings = client.get("/v1/generations").json()["generations"][0]["settings"]
    assert (settings["method"], settings["pulid_num_zero"], settings["pulid_ortho"]) == ("pulid", 16, "v1")
    refused = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"ControlNet": {"args": [
        unit | {"pulid_mode": "Balanced"}]}}})  # fmt: skip
    assert refused.status_code == 422 and "Fidelity, Extremely style" in refused.json()["detail"], refused.text


def test_refusals(make_client, serving, sdxl, faces_dir, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    plain = make_client(pipeline=sdxl, data_dir=data)  # InstantID's weights are on the pipeline, not served
    old = enroll(plain, faces_dir, "obama.jpg").json()["id"]
    assert [m["name"] for m in plain.get("/v1/models").json()["catalog"][0]["methods"]] == ["faceid"]
    error(generate(plain, old, method="instantid", **SIZE), 422, "invalid_request",
          "no 'instantid' weights loaded", "it runs faceid", "--method-weights instantid=FOLDER")  # fmt: skip
    error(generate(plain, old, method="nosuch", **SIZE), 422, "invalid_request", "nosuch", "instantid")
    make_client.close(plain)

    client = serving(data_dir=data)  # the same data, now with InstantID: the identity predates it
    message = error(generate(client, old, method="instantid", **SIZE), 422, "invalid_request",
                    f"identity {old}", "antelopev2", "enroll its photos again")  # fmt: skip
    assert "buffalo_l only" in message, message
    assert client.app.state.service.queue.depth == 0
    view = wait_finished(client, generate(client, old, seed=1, **SIZE).json()["id"])  # FaceID still runs it
    assert view["status"] == "done", view
    error(generate(client, old, method="instantid", identitynet_scale=-1, **SIZE), 422, "invalid_request")


def test_a_method_on_a_model_set_of_another_family_is_refused(make_client, pipe, instantid_dir, both_packs,  # noqa: F811
                                                              tmp_path):  # fmt: skip
    # at start: no model set of the server runs it (the tiny SD1.5 here)
    with pytest.raises(FaceIDError, match=r"--method-weights instantid: InstantID runs on SDXL base models, and this "
                                          r"server serves SD1.5"):  # fmt: skip
        make_client(pipeline=pipe, methods={"instantid": str(instantid_dir)}, face_models=str(both_packs))
    assert "instantid" not in pipe.methods  # the worker left the SD1.5 model set alone
    # at submit: a request naming a model set of another family, among several
    sd15 = ModelEntry(1, GenerationSettings(base_model="sd15"), "SD1.5")
    sdxl = ModelEntry(0, GenerationSettings(base_model="sdxl"), "SDXL")
    caps = Capabilities(methods=("faceid", "instantid"))
    with pytest.raises(NotServed, match=r"instantid \(InstantID\) runs on SDXL model sets.*is SD1.5.*\[0\] SDXL"):
        caps.check_model_set(GenerationSettings(method="instantid"), sd15, [sdxl, sd15])
    caps.check_model_set(GenerationSettings(method="instantid"), sdxl, [sdxl, sd15])
    caps.check_model_set(GenerationSettings(), sd15, [sdxl, sd15])


def test_what_stops_the_start(make_client, pipe, instantid_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(FaceIDError, match=r"--method-weights instantid=.*nope: no such folder.*ip-adapter.bin"):
        ServeConfig(data_dir=tmp_path, pipeline=pipe, methods={"instantid": str(tmp_path / "nope")})
    with pytest.raises(FaceIDError, match="faceid is the model set's own adapter"):
        ServeConfig(data_dir=tmp_path, pipeline=pipe, methods={"faceid": str(tmp_path)})
    buffalo_only = make_test_face_models_dir(tmp_path / "buffalo", pack="buffalo_l")
    with pytest.raises(MissingWeightsError, match="method instantid needs insightface's antelopev2 face models"):
        make_client(pipeline=pipe, methods={"instantid": str(instantid_dir)}, face_models=str(buffalo_only))
    # faceid serve says each in one line, before any model loads
    base = ["serve", "--data-dir", str(tmp_path / "d"), "--face-models", str(buffalo_only)]
    assert main([*base, "--method-weights", f"instantid={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and len(err.splitlines()) == 1, err
    assert main([*base, "--method-weights", f"instantid={instantid_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "antelopev2" in err and "glintr100.onnx" in err, err
    assert main([*base, "--method-weights", "instantid="]) == 2
    assert "--method-weights NAME=FOLDER" in capsys.readouterr().err
    # NAME alone: the released files at their pins, for a method the table pins; InfiniteYou's are not
    assert main([*base, "--method-weights", "instantid"]) == 2  # accepted; then the face models are missing
    assert "antelopev2" in capsys.readouterr().err
    assert main([*base, "--method-weights", "infiniteyou"]) == 2
    assert "--method-weights infiniteyou needs --method-weights infiniteyou=FOLDER" in capsys.readouterr().err
    assert check_methods({"pulid": None}) == {"pulid": None}
    with pytest.raises(FaceIDError, match=r"--method-weights infiniteyou=None: no such folder"):
        check_methods({"infiniteyou": None})


def test_face_files_and_rows_of_an_earlier_version_still_read(tmp_path):
    from faceid.service.files import DataDir

    data = DataDir(tmp_path)
    identity = "0" * 32
    data.identity_dir(identity).mkdir(parents=True)
    arrays = {"box": np.zeros(4, np.float32), "score": np.float32(0.9), "landmarks": np.zeros((5, 2), np.float32),
              "embedding": np.ones(512, np.float32), "aligned": np.zeros((112, 112, 3), np.uint8),
              "crop_224": np.zeros((224, 224, 3), np.uint8)}  # fmt: skip
    np.savez(data.face(identity, 0), **arrays)  # the layout before recognizers were kept
    face = data.load_face(identity, 0)
    assert face.embeddings == {} and face.raw_embeddings == {} and face.image_size is None
    np.testing.assert_array_equal(face.embedding, arrays["embedding"])
    assert face_recognizers(IdentityFace(recognizers=None)) == ["buffalo_l"]
    # and a face of this version keeps every pack's vectors and the photo size
    face.embeddings = {"buffalo_l": np.full(512, 0.5, np.float32)}
    face.raw_embeddings = {"antelopev2": np.arange(512, dtype=np.float32)}
    face.image_size = (640, 480)
    data.save_face(identity, 1, face)
    again = data.load_face(identity, 1)
    np.testing.assert_array_equal(again.raw_embeddings["antelopev2"], face.raw_embeddings["antelopev2"])
    assert set(again.embeddings) == {"buffalo_l"} and again.image_size == (640, 480)


# ---------------------------------------------------------------------- the web app (chromium, as test_webapp)
def test_web_app_method_menu_instantid_and_compare(make_server, browser,  # noqa: F811
                                                    sdxl, instantid_dir, both_packs, faces_dir,  # noqa: F811
                                                   tmp_path):  # fmt: skip
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = make_server(pipeline=sdxl, methods={"instantid": str(instantid_dir)}, face_models=str(both_packs))
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "method-box").is_displayed())
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#method option")]
    assert options == ["IP-Adapter-FaceID", "InstantID"], options
    assert not browser.find_element(By.ID, "identitynet-scale-field").is_displayed()  # FaceID has no IdentityNet
    assert "non-commercial research only" in browser.find_element(By.ID, "method-licence").text
    Select(browser.find_element(By.ID, "method")).select_by_value("instantid")
    assert browser.find_element(By.ID, "identitynet-scale-field").is_displayed()
    assert browser.find_element(By.ID, "identitynet-scale").get_attribute("placeholder") == "default 0.8"
    assert browser.find_element(By.ID, "scale").get_attribute("value") == "0.8"  # InstantID's own default
    licence = browser.find_element(By.ID, "method-licence").text
    assert "Apache-2.0" in licence and "antelopev2" in licence and "not for commercial use" in licence, licence

    # InstantID: the image, its method in the caption
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    for field, value in {
        "steps": 2,
        "width": 48,
        "height": 32,
        "seed": 7,
        "count": 1,
        "identitynet-scale": 0.6,
    }.items():
        set_value(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1)
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "method instantid (IdentityNet 0.6)" in caption and "strength 0.8" in caption, caption
    screenshot(browser, tmp_path, "methods-1-instantid")

    # compare InstantID with FaceID: two generations of one seed, their images side by side with their methods
    browser.find_element(By.ID, "seed").clear()  # the page draws one seed for both
    browser.find_element(By.ID, "compare").click()
    assert Select(browser.find_element(By.ID, "compare-method")).first_selected_option.text == "IP-Adapter-FaceID"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#comparison img.generated") == 2)
    figures = browser.find_elements(By.CSS_SELECTOR, "#comparison figure.compared")
    assert [f.get_attribute("data-method") for f in figures] == ["instantid", "faceid"]
    texts = [f.find_element(By.TAG_NAME, "figcaption").text for f in figures]
    assert texts[0].startswith("InstantID (instantid) · similarity") and texts[1].startswith("IP-Adapter-FaceID"), texts
    boxes = [f.rect for f in figures]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]  # side by side
    screenshot(browser, tmp_path, "methods-2-compare")
    newest = httpx.get(f"{url}/v1/generations").json()["generations"][:2]
    runs = {g["settings"]["method"]: g["settings"] for g in newest}
    assert set(runs) == {"instantid", "faceid"} and runs["instantid"]["seed"] == runs["faceid"]["seed"]
    assert "combine" in runs["faceid"] and "identitynet_scale" not in runs["faceid"]  # FaceID at its own defaults

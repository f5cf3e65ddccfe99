"""The AUTOMATIC1111 API of ``faceid serve`` (``/sdapi/v1``), driven by ``webuiapi`` (an A1111 client, on
``requests``) against a real uvicorn server on loopback, as Open WebUI's or SillyTavern's A1111 engine drives it."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
from conftest import both_databases
from PIL import Image
from test_webapp import make_server  # noqa: F401 (a fixture)

webuiapi = pytest.importorskip("webuiapi")

KEY = "a1111-test-key"
TINY = {"steps": 2, "width": 24, "height": 16}


@pytest.fixture
def base(make_server):  # noqa: F811
    return make_server(api_keys=(KEY, "other-key"))


def api_for(base: str, key: str = KEY):
    host, port = base.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username="anyone", password=key)


def enroll(base: str, name: str, photo, key: str = KEY) -> dict:
    with open(photo, "rb") as f:
        answer = requests.post(f"{base}/v1/identities", files={"photos": f}, data={"name": name},
                               headers={"Authorization": f"Bearer {key}"}, timeout=60)  # fmt: skip
    assert answer.status_code == 201, answer.text
    return answer.json()


@both_databases
def test_checkpoints_are_identities_picked_per_key(base, faces_dir):
    obama = enroll(base, "Obama", faces_dir / "obama.jpg")
    enroll(base, "Biden", faces_dir / "biden.jpg")
    enroll(base, "someone", faces_dir / "obama2.jpg", key="other-key")
    api = api_for(base)
    names = api.util_get_model_names()
    assert names == sorted([f"Biden [{names[0].split('[')[1][:-1]}]", f"Obama [{obama['id'][:10]}]"])
    assert api_for(base, "other-key").util_get_model_names()[0].startswith("someone [")
    assert api.get_options()["sd_model_checkpoint"] is None
    api.util_set_model("obama")  # webuiapi lower-cases names and takes the closest title
    assert api.util_get_current_model() == f"Obama [{obama['id'][:10]}]"
    assert api_for(base, "other-key").get_options()["sd_model_checkpoint"] is None  # per key
    samplers = api.util_get_sampler_names()
    assert "Euler a" in samplers and "DPM++ 2M" in samplers
    assert "karras" in api.util_get_scheduler_names()


def test_txt2img_and_img2img_draw_the_picked_person(base, faces_dir):
    obama = enroll(base, "obama", faces_dir / "obama.jpg")
    api = api_for(base)
    api.util_set_model("obama")
    result = api.txt2img(prompt="a photo of a person in a garden", seed=7, batch_size=2, n_iter=2, **TINY)
    assert [image.size for image in result.images] == [(24, 16)] * 4
    assert result.info["all_seeds"] == [7, 8, 9, 10] and result.info["sampler_name"] == "Euler a"
    assert "Seed: 7" in result.info["infotexts"][0] and "Model: obama [" in result.info["infotexts"][0]
    headers = {"Authorization": f"Bearer {KEY}"}
    job = requests.get(f"{base}/v1/generations", headers=headers, timeout=60).json()["generations"][0]
    assert job["identity_ids"] == [obama["id"]] * 1 and job["settings"]["scheduler"] == "euler-a"
    # the same picture as /v1 gives for those settings
    again = {"prompt": "a photo of a person in a garden", "seed": 7, "num_images_per_prompt": 1, "identity_id":
             obama["id"], "scheduler": "euler-a", "guidance_scale": 7.0, "num_inference_steps": 2, "width": 24,
             "height": 16}  # fmt: skip
    view = requests.post(f"{base}/v1/generations", json=again, headers=headers, timeout=60).json()
    done = _wait(base, view["id"], headers)
    expected = Image.open(io.BytesIO(requests.get(base + done["images"][0], headers=headers, timeout=60).content))
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(expected.convert("RGB")))
    # img2img: the init image's content, at the requested size; with a mask: inpainting
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB").resize((48, 32))
    edited = api.img2img(images=[photo], prompt="a portrait", denoising_strength=0.5, steps=2, width=48, height=32)
    assert [image.size for image in edited.images] == [(48, 32)]
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (24, 0, 48, 32))
    inpainted = api.img2img(images=[photo], mask_image=mask, prompt="a portrait", steps=2, width=48, height=32)
    assert [image.size for image in inpainted.images] == [(48, 32)]
    modes = [
        g["mode"] for g in requests.get(f"{base}/v1/generations", headers=headers, timeout=60).json()["generations"]
    ]
    assert modes[:2] == ["inpaint", "img2img"]
    assert requests.get(f"{base}/v1/uploads", headers=headers, timeout=60).json() == []  # nothing kept


def test_a_controlnet_face_unit_is_the_person(base, faces_dir):
    api = api_for(base)
    face = Image.open(faces_dir / "biden.jpg")
    unit = webuiapi.ControlNetUnit(image=face, module="ip-adapter_face_id", model="ip-adapter-faceid_sd15",
                                   weight=0.8, guidance_start=0.0, guidance_end=0.5)  # fmt: skip
    # (a fresh alwayson_scripts each time: webuiapi writes the units into its shared default dict otherwise)
    result = api.txt2img(prompt="a photo of a person", seed=3, controlnet_units=[unit], alwayson_scripts={}, **TINY)
    assert [image.size for image in result.images] == [(24, 16)]
    headers = {"Authorization": f"Bearer {KEY}"}
    job = requests.get(f"{base}/v1/generations", headers=headers, timeout=60).json()["generations"][0]
    assert job["settings"]["scale"] == 0.8 and job["settings"]["identity_window"] == [0.0, 0.5]
    assert requests.get(f"{base}/v1/identities", headers=headers, timeout=60).json() == []  # the photo: this request's
    # a module this server does not run is refused, saying which it runs
    canny = webuiapi.ControlNetUnit(image=face, module="canny", model="control_canny")
    with pytest.raises(RuntimeError) as refused:
        api.txt2img(prompt="a photo of a person", controlnet_units=[canny], alwayson_scripts={}, **TINY)
    status, body = refused.value.args
    assert status == 422 and "ip-adapter_face_id" in json.loads(body)["detail"]


def test_errors_and_auth(base, faces_dir):
    enroll(base, "obama", faces_dir / "obama.jpg")
    api = api_for(base)
    with pytest.raises(RuntimeError) as no_person:
        api.txt2img(prompt="a photo of a person", **TINY)
    status, body = no_person.value.args
    assert status == 422 and "sd_model_checkpoint" in json.loads(body)["detail"]
    api.util_set_model("obama")
    for bad, words in (({"sampler_name": "Heun"}, "this server has"), ({"enable_hr": True}, "hires fix"),
                       ({"restore_faces": True}, "face restoration"), ({"width": 4096, "height": 4096}, "at most"),
                       ({"width": 25}, "multiple of 8")):  # fmt: skip
        with pytest.raises(RuntimeError) as refused:
            api.txt2img(prompt="a photo of a person", **{**TINY, **bad})
        status, body = refused.value.args
        assert status == 422 and words in json.loads(body)["detail"], body
    wrong = requests.get(f"{base}/sdapi/v1/sd-models", auth=("user", "wrong"), timeout=60)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Basic")
    bearer = requests.get(f"{base}/sdapi/v1/sd-models", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bearer.status_code == 200 and len(bearer.json()) == 1
    # images inside JSON: a face photo larger than /v1's JSON limit (1 MB) is taken, checked as an upload is
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8))
    big.paste(Image.open(faces_dir / "obama.jpg").convert("RGB").resize((400, 400)), (250, 250))
    encoded = io.BytesIO()
    big.save(encoded, format="PNG")
    assert len(encoded.getvalue()) > 1024 * 1024
    unit = {"module": "ip-adapter_face_id", "image": base64.b64encode(encoded.getvalue()).decode()}
    body = {"prompt": "a photo of a person", **TINY, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    answer = requests.post(f"{base}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    bomb = {**unit, "image": base64.b64encode(b"not an image").decode()}
    body["alwayson_scripts"] = {"ControlNet": {"args": [bomb]}}
    answer = requests.post(f"{base}/sdapi/v1/txt2img", json=body, auth=("u", KEY), timeout=60)
    assert answer.status_code == 400 and answer.json()["error"] == "bad_image"
    # progress and interrupt answer for the caller
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0
    assert api.interrupt() == {}


def _wait(base, job_id, headers):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view = requests.get(f"{base}/v1/generations/{job_id}", headers=headers, timeout=60).json()
        if view["status"] in ("done", "failed", "cancelled"):
            return view
        time.sleep(0.05)
    raise AssertionError(view)

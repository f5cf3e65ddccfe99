"""The OpenAI Images API of ``faceid serve`` (``/openai/v1``), driven by the official ``openai`` package as a user's
script drives OpenAI: its HTTP goes through FastAPI's TestClient (an ``httpx.Client``), so no port is opened."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from test_serve import enroll, make_client, png, wait_finished  # noqa: F401  (make_client: a fixture)

openai = pytest.importorskip("openai")

KEY = "openai-test-key"
SIZE = "24x16"  # TINY's size, as OpenAI writes it


def client_for(http, key: str = KEY):
    return openai.OpenAI(base_url="http://localhost/openai/v1", api_key=key, http_client=http, max_retries=0)


def decoded(item) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "PNG"
    return image


@pytest.fixture
def server(make_client):  # noqa: F811
    return make_client(api_keys=(KEY, "other-key"))


def test_models_are_the_callers_identities(server, faces_dir):
    headers = {"Authorization": f"Bearer {KEY}"}
    named = enroll(server, faces_dir, headers=headers, name="obama").json()
    unnamed = enroll(server, faces_dir, headers=headers).json()
    enroll(server, faces_dir, headers={"Authorization": "Bearer other-key"}, name="someone else")
    ids = sorted(model.id for model in client_for(server).models.list())
    assert ids == sorted(["obama", unnamed["id"]])
    assert named["id"] not in ids  # a name that names one identity alone is its model id
    assert [m.id for m in client_for(server, "other-key").models.list()] == ["someone else"]


def test_generate_by_name_and_by_id(server, faces_dir):
    identity = enroll(server, faces_dir, headers={"Authorization": f"Bearer {KEY}"}, name="obama").json()
    client = client_for(server)
    made = client.images.generate(model="obama", prompt="a photo of a person in a garden", n=2, size=SIZE,
                                  response_format="b64_json", extra_body={"quality": "standard"})  # fmt: skip
    images = [decoded(item) for item in made.data]
    assert [image.size for image in images] == [(24, 16)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two seeds
    assert made.data[0].revised_prompt == "a photo of a person in a garden"
    by_id = client.images.generate(model=identity["id"], prompt="a portrait", size=SIZE, response_format="b64_json")
    assert decoded(by_id.data[0]).size == (24, 16)
    # the job went through the /v1 service: it is listed there, with OpenAI's n as its images per prompt
    listed = server.get("/v1/generations", headers={"Authorization": f"Bearer {KEY}"}).json()["generations"]
    assert [g["settings"]["num_images_per_prompt"] for g in listed] == [1, 2]


def test_url_links_need_no_key_and_cannot_be_forged(server, faces_dir):
    enroll(server, faces_dir, headers={"Authorization": f"Bearer {KEY}"}, name="obama")
    made = client_for(server).images.generate(model="obama", prompt="a portrait", size=SIZE)  # default: url
    url = made.data[0].url
    assert url.startswith("http://localhost/openai/v1/images/") and made.data[0].b64_json is None
    image = server.get(url)  # no Authorization header: as a browser or chat client fetches it
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (24, 16)
    forged = server.get(url[:-4] + "0000")
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_link"


def test_edit_without_mask_keeps_nothing(server, faces_dir):
    client = client_for(server)
    photos = [(faces_dir / name).open("rb") for name in ("obama.jpg", "obama2.jpg")]
    try:
        one = client.images.edit(image=photos[0], prompt="an astronaut", size=SIZE, response_format="b64_json")
        photos[0].seek(0)
        two = client.images.edit(image=photos, prompt="an astronaut", n=2, size=SIZE, response_format="b64_json")
    finally:
        for photo in photos:
            photo.close()
    assert [decoded(item).size for item in one.data] == [(24, 16)]
    assert [decoded(item).size for item in two.data] == [(24, 16)] * 2
    headers = {"Authorization": f"Bearer {KEY}"}
    assert server.get("/v1/identities", headers=headers).json() == []  # the photos were for those requests only
    jobs = server.get("/v1/generations", headers=headers).json()["generations"]
    assert [len(job["identity_ids"]) for job in jobs] == [1, 1]


def test_edit_with_mask_redraws_the_transparent_area(server, faces_dir):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB").resize((48, 32))
    photo_png = io.BytesIO()
    photo.save(photo_png, format="PNG")
    mask = Image.new("RGBA", (48, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (24, 0, 48, 32))  # the right half is redrawn
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    made = client_for(server).images.edit(
        image=("photo.png", photo_png.getvalue(), "image/png"),
        mask=("mask.png", mask_png.getvalue(), "image/png"),
        prompt="a person in a red jacket",
        response_format="b64_json",
    )
    image = decoded(made.data[0])
    assert image.size == (48, 32)  # the first image's size
    headers = {"Authorization": f"Bearer {KEY}"}
    job = server.get("/v1/generations", headers=headers).json()["generations"][0]
    assert job["mode"] == "inpaint"
    assert server.get("/v1/uploads", headers=headers).json() == []  # its image and mask were for it only
    # the same picture as /v1's inpainting of that photo, white (redrawn) where OpenAI's mask is transparent
    white_right = Image.new("RGB", (48, 32), "black")
    white_right.paste("white", (24, 0, 48, 32))
    uploads = []
    for name, picture in (("photo.png", photo), ("mask.png", white_right)):
        data = io.BytesIO()
        picture.save(data, format="PNG")
        files = {"image": (name, data.getvalue(), "image/png")}
        uploads.append(server.post("/v1/uploads", files=files, headers=headers).json()["id"])
    photos = {"photos": ("photo.png", photo_png.getvalue(), "image/png")}  # the person: the edit's photo
    identity = server.post("/v1/identities", files=photos, headers=headers).json()["id"]
    settings = {key: job["settings"][key] for key in ("prompt", "seed", "num_inference_steps", "strength")}
    body = {**settings, "identity_id": identity, "init_image": uploads[0], "mask_image": uploads[1]}
    again = wait_finished(server, server.post("/v1/generations", json=body, headers=headers).json()["id"], headers)
    expected = png(server.get(again["images"][0], headers=headers))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_errors_in_openais_shape(server, faces_dir):
    client = client_for(server)
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="nobody", prompt="a portrait", size=SIZE)
    assert missing.value.code == "model_not_found" and "GET /openai/v1/models" in missing.value.message
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        client_for(server, "wrong-key").models.list()
    assert unauthorized.value.code == "invalid_api_key"
    enroll(server, faces_dir, headers={"Authorization": f"Bearer {KEY}"}, name="obama")
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(model="obama", prompt="a portrait", size="25x16")
    assert bad_size.value.param == "size" and "multiples of 8" in bad_size.value.message
    with pytest.raises(openai.BadRequestError) as too_large:
        client.images.generate(model="obama", prompt="a portrait", size="4096x4096")
    assert "at most 2048" in too_large.value.message
    with pytest.raises(openai.BadRequestError) as invalid:
        client.images.generate(model="obama", prompt="a portrait", n=0)
    assert invalid.value.body["type"] == "invalid_request_error" and invalid.value.param == "n"
    with pytest.raises(openai.BadRequestError) as no_face:
        blank = io.BytesIO()
        Image.new("RGB", (64, 64), "gray").save(blank, format="PNG")
        client.images.edit(image=("blank.png", blank.getvalue(), "image/png"), prompt="a portrait")
    assert no_face.value.code == "no_face"
    # another key's identity is not a model of this key
    with pytest.raises(openai.NotFoundError):
        client_for(server, "other-key").images.generate(model="obama", prompt="a portrait", size=SIZE)
    # errors made outside the routes (an unknown path, the body limit) come in OpenAI's shape too
    unknown = server.get("/openai/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"
    huge = server.post("/openai/v1/images/generations", content=b"x" * (2 * 1024 * 1024),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert huge.status_code == 413 and set(huge.json()["error"]) == {"message", "type", "code", "param"}
    # unknown fields are ignored, as OpenAI's server ignores them for models that do not use them
    made = client.images.generate(model="obama", prompt="a portrait", size=SIZE, response_format="b64_json",
                                  style="vivid", user="someone", extra_body={"moderation": "low"})  # fmt: skip
    assert len(made.data) == 1


@pytest.fixture(scope="module")
def transcriber(tmp_path_factory):
    from tiny_models import make_tiny_whisper

    from faceid.speech import Transcriber

    return Transcriber.from_pretrained(make_tiny_whisper(tmp_path_factory.mktemp("whisper")))


def recording(container: str, codec: str, seconds: float = 1.0, rate: int = 48_000) -> bytes:
    """A tone with noise, encoded as a browser or phone would send it (PyAV: WAV, WebM/Opus, Ogg/Opus...)."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as file:
        stream = file.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            file.mux(packet)
        for packet in stream.encode(None):
            file.mux(packet)
    return out.getvalue()


def test_transcriptions(make_client, transcriber):  # noqa: F811
    from faceid.speech import SAMPLING_RATE, decode_audio

    server = make_client(api_keys=(KEY,), transcriber=transcriber)
    client = client_for(server)
    for container, codec in (("wav", "pcm_s16le"), ("webm", "libopus"), ("ogg", "libopus")):
        audio = recording(container, codec)
        text = client.audio.transcriptions.create(model="whisper-1", file=(f"prompt.{container}", audio))
        # what the speech pipeline gives for the same decoded samples: the route decodes and transcribes, no more
        samples = decode_audio(audio)
        assert abs(samples.size - SAMPLING_RATE) < SAMPLING_RATE * 0.1  # 1 s, resampled to 16 kHz mono
        expected = transcriber.pipeline({"raw": samples, "sampling_rate": SAMPLING_RATE})["text"].strip()
        assert text.text == expected and text.text, container
    plain = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="text")
    assert plain == expected
    prompted = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), prompt="Barack Obama")
    assert prompted.text == transcriber(audio, prompt="Barack Obama") != expected  # the prompt reaches the decoder
    with pytest.raises(openai.BadRequestError) as language:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), language="fr")
    assert "English-only" in language.value.message
    with pytest.raises(openai.BadRequestError) as not_audio:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF not really"))
    assert not_audio.value.code == "bad_audio" and not_audio.value.param == "file"
    without = make_client(data_dir=server.app.state.service.config.data_dir.parent / "other")
    with pytest.raises(openai.BadRequestError) as missing:
        client_for(without).audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    assert missing.value.code == "invalid_request" and "--speech-model" in missing.value.message
    assert server.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["speech"] == transcriber.name
    assert without.get("/v1/models").json()["speech"] is None

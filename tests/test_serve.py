"""``faceid serve``: the HTTP API end to end, offline, on the tiny SD1.5 model and the real photos.

Most tests use FastAPI's TestClient on an app built around the module's one pipeline (``create_app`` takes a
ready pipeline, so no test pays for loading); one starts a real ``faceid serve`` process and kills it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bad_files import huge_blank_png, jpeg_bytes, truncated_jpeg
from conftest import both_databases
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from faceid.outputs import read_settings  # noqa: E402
from faceid.service import ServeConfig, create_app  # noqa: E402
from faceid.settings import GenerationSettings  # noqa: E402

TINY = {"num_inference_steps": 2, "width": 24, "height": 16}
DEADLINE = 60.0  # seconds any wait in these tests may take


class Recording:
    """The pipeline, counting its calls; with ``hold``, each call waits at its first step until ``go`` is set.
    ``after_preview(step)``: called in the worker after each preview was delivered (to wait for a reader)."""

    def __init__(self, pipe, hold: bool = False, after_preview=None) -> None:
        self.wrapped = pipe  # not ``pipe``: that is the pipeline's own diffusers pipeline, read through __getattr__
        self.calls: list[GenerationSettings] = []
        self.started = threading.Event()
        self.go = threading.Event()
        self.after_preview = after_preview
        if not hold:
            self.go.set()

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs["settings"])
        user = kwargs["callback_on_step_end"]

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            self.started.set()
            assert self.go.wait(DEADLINE)
            return user(pipeline, step, timestep, callback_kwargs)

        kwargs["callback_on_step_end"] = on_step_end
        deliver = kwargs.get("on_preview")
        if deliver is not None and self.after_preview is not None:

            def on_preview(step, total, images):
                deliver(step, total, images)
                self.after_preview(step)

            kwargs["on_preview"] = on_preview
        return self.wrapped(*args, **kwargs)


@pytest.fixture
def make_client(tmp_path, pipe, analyzer, database):
    """``make_client(**config)`` -> a TestClient (started) on an app in ``tmp_path/data``, on the test's
    ``database`` (SQLite unless ``@both_databases``); closed after the test (``make_client.close(client)`` closes
    one before)."""
    opened = []

    def make(pipeline=None, data_dir=None, **options):
        data_dir = data_dir or tmp_path / "data"
        options.setdefault("database_url", database.url(data_dir))
        config = ServeConfig(data_dir=data_dir, pipeline=pipeline or pipe, analyzer=analyzer, **options)
        client = TestClient(create_app(config), base_url="http://localhost")  # a Host the server answers
        client.__enter__()
        opened.append(client)
        return client

    def close(client):
        """Stop a server before the test ends (a restart)."""
        opened.remove(client)
        client.__exit__(None, None, None)

    make.close = close
    yield make
    for client in opened:
        held = client.app.state.service.workers[0].pipeline
        if isinstance(held, Recording):
            held.go.set()  # a failed test must not leave a worker waiting
        client.__exit__(None, None, None)


def enroll(client, faces_dir, *names, headers=None, **form):
    files = [("photos", (name, (faces_dir / name).read_bytes(), "image/jpeg")) for name in names or ("obama.jpg",)]
    return client.post("/v1/identities", files=files, data=form, headers=headers)


def generate(client, identity_id, headers=None, **settings):
    body = {"prompt": "a photo of a person in a garden", **TINY, "identity_id": identity_id, **settings}
    return client.post("/v1/generations", json=body, headers=headers)


def wait_finished(client, job_id, headers=None) -> dict:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        view = client.get(f"/v1/generations/{job_id}", headers=headers).json()
        if view["status"] in ("done", "failed", "cancelled"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"generation {job_id} did not finish in {DEADLINE} s: {view}")


def event_stream(client, job_id, headers=None):
    """A generation's events, (kind, data) each, as they arrive."""
    kind = None
    with client.stream("GET", f"/v1/generations/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


def events(client, job_id, headers=None) -> list[tuple[str, dict]]:
    return list(event_stream(client, job_id, headers))


def png(response) -> Image.Image:
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def error(response, status: int, code: str, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message = body["error"]["message"]
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# ---------------------------------------------------------------------- the whole path
@both_databases
def test_enroll_generate_events_and_image(make_client, faces_dir, pipe, analyzer):
    client = make_client()
    response = enroll(client, faces_dir, "obama.jpg", name="Barack")
    assert response.status_code == 201, response.text
    identity = response.json()
    assert identity["name"] == "Barack" and identity["warnings"] == [] and len(identity["faces"]) == 1
    face = identity["faces"][0]
    assert face["score"] > 0.5 and len(face["box"]) == 4 and face["faces_found"] == 1
    assert png(client.get(face["crop_url"])).size == (112, 112)
    assert client.get(f"/v1/identities/{identity['id']}").json()["faces"] == identity["faces"]
    assert [i["id"] for i in client.get("/v1/identities").json()] == [identity["id"]]

    response = generate(client, identity["id"], num_images_per_prompt=2, seed=5)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["queue_position"] == 0
    seen = events(client, accepted["id"])
    kinds = [kind for kind, _ in seen]
    assert kinds == ["queued", "progress", "progress", "done"], seen
    assert [data["step"] for kind, data in seen if kind == "progress"] == [1, 2]
    view = client.get(f"/v1/generations/{accepted['id']}").json()
    assert view["status"] == "done" and view["progress"] == {"step": 2, "total": 2} and view["error"] is None
    assert view["images"] == seen[-1][1]["images"] and len(view["images"]) == 2
    assert view["settings"]["seed"] == [5, 6] and view["settings"]["guidance_scale"] == 7.5  # resolved

    for url, seed in zip(view["images"], (5, 6), strict=True):
        image = png(client.get(url))
        assert image.size == (24, 16)
        assert image.text["prompt"] == "a photo of a person in a garden"  # the CLI's plain chunks
        stored = json.loads(image.text["faceid"])
        assert stored["seed"] == seed and stored["num_images_per_prompt"] == 1
        assert stored["identity_id"] == identity["id"] and stored["generation_id"] == accepted["id"]
    # The PNG's settings reproduce it with the same photo, as `faceid generate --settings IMAGE.png` does.
    path = client.app.state.service.data.image(view["images"][0].split("/")[-1].removesuffix(".png"))
    again = pipe(face=analyzer.get(faces_dir / "obama.jpg"), settings=GenerationSettings.from_png(path)).images[0]
    served = np.asarray(Image.open(path), dtype=int)
    assert np.abs(np.asarray(again, dtype=int) - served).max() <= 1

    # The server's side: models, health, metrics, API description.
    models = client.get("/v1/models").json()
    assert models["workers"][0]["loaded"] and models["workers"][0]["family"] == "SD1.5"
    assert models["defaults"]["num_inference_steps"] == 30
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'faceid_jobs_finished_total{status="done"} 1.0' in text and "faceid_images_generated_total 2.0" in text
    assert "faceid_queue_depth 0.0" in text and "faceid_job_latency_seconds_bucket" in text
    schema = client.get("/openapi.json").json()
    assert {"/v1/identities", "/v1/generations", "/v1/generations/{job_id}/events"} <= set(schema["paths"])
    assert "num_inference_steps" in json.dumps(schema)  # the GenerationSettings fields are the request's
    assert client.get("/docs").status_code == 200


def test_png_names_the_models_without_their_paths(make_client, faces_dir, pipe, analyzer, tmp_path_factory):
    """A served image names the server's local model files by name and sha256 (a folder by name) and holds no
    path in any text chunk; its settings still reproduce it on the same models."""
    import hashlib

    client = make_client()
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    view = wait_finished(client, generate(client, identity, seed=4).json()["id"])
    path = client.app.state.service.data.image(view["images"][0].split("/")[-1].removesuffix(".png"))
    with Image.open(path) as image:
        image.load()
        chunks = dict(image.text)
    assert not [key for key, text in chunks.items() if str(tmp_path_factory.getbasetemp()) in text], chunks
    stored = read_settings(path)
    adapter = Path(pipe.adapter_source)
    assert stored["model_files"] == {
        "base_model": {"name": Path(pipe.base_model).name},
        "adapter": {"name": adapter.name, "sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()},
    }
    assert (stored["identity_id"], stored["generation_id"], stored["seed"]) == (identity, view["id"], 4)
    again = pipe(face=analyzer.get(faces_dir / "obama.jpg"), settings=GenerationSettings.from_png(path)).images[0]
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(Image.open(path), dtype=int)).max() <= 1


def test_several_photos_and_several_people(make_client, faces_dir):
    client = make_client()
    obama = enroll(client, faces_dir, "obama.jpg", "obama2.jpg").json()
    assert [f["k"] for f in obama["faces"]] == [0, 1]
    biden = enroll(client, faces_dir, "biden.jpg").json()
    prompts = ["a photo of a person", "an oil painting of a person"]
    response = generate(client, None, identity_ids=[obama["id"], biden["id"]], prompt=prompts, seed=[1, 2])
    assert response.status_code == 202, response.text
    view = wait_finished(client, response.json()["id"])
    assert view["status"] == "done" and len(view["images"]) == 2
    stored = [read_settings(io.BytesIO(client.get(url).content)) for url in view["images"]]
    assert [(s["prompt"], s["identity_id"], s["seed"]) for s in stored] == [
        (prompts[0], obama["id"], 1),
        (prompts[1], biden["id"], 2),
    ]
    # identity_ids needs one prompt per identity
    error(generate(client, None, identity_ids=[obama["id"], biden["id"]]), 422, "invalid_request", "one prompt per")


# ---------------------------------------------------------------------- bad uploads and limits
def _no_face() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (120, 160, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def _truncated(tmp_path: Path) -> bytes:
    truncated_jpeg(tmp_path / "t.jpg")
    return (tmp_path / "t.jpg").read_bytes()


BAD_UPLOADS = {
    # name: (the upload's bytes, status, code, words in the message)
    "zero_byte": (lambda tmp: b"", 400, "bad_image", ["empty"]),
    "truncated": (_truncated, 400, "bad_image", ["truncated"]),
    "not_an_image": (lambda tmp: b"hello, I am not a photo", 400, "bad_image", ["not an image"]),
    "decompression_bomb": (lambda tmp: huge_blank_png(30000, 30000), 400, "bad_image", ["too large"]),
    "no_face": (lambda tmp: _no_face(), 422, "no_face", ["no face"]),
    "over_upload_limit": (lambda tmp: jpeg_bytes(np.zeros((900, 900, 3), np.uint8)) + b"\0" * 300_000, 413,
                          "limit_exceeded", ["MB"]),
    "over_pixel_limit": (lambda tmp: jpeg_bytes(np.zeros((1200, 1000, 3), np.uint8)), 400, "bad_image", ["too large"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_is_4xx_and_writes_nothing(case, make_client, faces_dir, tmp_path):
    client = make_client(max_upload_bytes=300_000, max_pixels=1_100_000)
    make, status, code, words = BAD_UPLOADS[case]
    before = files_under(tmp_path / "data")
    good = ("photos", ("obama.jpg", (faces_dir / "obama.jpg").read_bytes(), "image/jpeg"))
    # the bad photo second: the good one before it is not kept either
    files = [good, ("photos", ("bad.jpg", make(tmp_path), "image/jpeg"))]
    message = error(client.post("/v1/identities", files=files), status, code, *words)
    assert "photos[1] ('bad.jpg')" in message or code == "limit_exceeded"
    assert files_under(tmp_path / "data") == before  # no photo, crop or embedding
    assert client.get("/v1/identities").json() == []  # no row


def test_request_limits(make_client, faces_dir):
    client = make_client(max_photos=2, max_images=4, max_steps=10, max_side=64)
    error(enroll(client, faces_dir, "obama.jpg", "obama2.jpg", "biden.jpg"), 413, "limit_exceeded", "at most 2")
    error(client.post("/v1/identities", data={"name": "x"}), 422, "invalid_request", "photos")
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    error(generate(client, identity, num_images_per_prompt=5), 422, "limit_exceeded", "at most 4")
    error(generate(client, identity, num_inference_steps=11), 422, "limit_exceeded", "num_inference_steps")
    error(generate(client, identity, width=72), 422, "limit_exceeded", "width")
    error(generate(client, identity, width=25), 422, "invalid_request", "width", "multiple of 8")
    error(generate(client, identity, colour="red"), 422, "invalid_request", "colour", "unknown field")
    error(generate(client, identity, seed=[1, 2]), 422, "invalid_request", "2 seeds for 1 images")
    error(generate(client, None), 422, "invalid_request", "identity_id")
    error(generate(client, "0" * 32), 404, "not_found", "GET /v1/identities")
    error(generate(client, identity, base_model="some/other-model"), 422, "invalid_request", "base_model")
    form = client.post("/v1/generations", data={"identity_id": identity})
    error(form, 422, "invalid_request", "Content-Type: application/json")
    big = {"prompt": "x" * 2_000_000, "identity_id": identity}
    error(client.post("/v1/generations", json=big), 413, "limit_exceeded", "larger than")
    error(client.get("/v1/nothing-here"), 404, "not_found", "/docs")
    error(client.get("/v1/generations/../../etc/passwd"), 404, "not_found")
    error(client.get("/v1/images/..%2F..%2Ffaceid.db.png"), 404, "not_found")


def test_chunked_upload_over_the_limit_is_413(make_client):
    client = make_client(max_upload_bytes=1000, max_photos=1)  # bodies up to 1000 + 64 KiB of form overhead

    def chunks():  # no Content-Length: the limit applies to the bytes as they arrive
        yield b'--x\r\nContent-Disposition: form-data; name="photos"; filename="a.jpg"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 10_000

    response = client.post(
        "/v1/identities", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    error(response, 413, "limit_exceeded", "larger than")
    assert client.get("/v1/identities").json() == []


def test_full_queue_is_429_with_retry_after(make_client, faces_dir):
    client = make_client(max_queue=2, start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    first, second = (generate(client, identity, seed=s) for s in (1, 2))
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json()["queue_position"] == 1
    refused = generate(client, identity, seed=3)
    error(refused, 429, "queue_full", "try again")
    assert int(refused.headers["Retry-After"]) >= 1
    store = client.app.state.service.store
    assert len(store.unfinished_jobs()) == 2  # the refused job left no row
    assert client.get(f"/v1/generations/{second.json()['id']}").json()["queue_position"] == 1


# ---------------------------------------------------------------------- cancellation
@both_databases
def test_cancel_queued_and_running(make_client, faces_dir, pipe):
    recording = Recording(pipe, hold=True)
    client = make_client(pipeline=recording)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    running = generate(client, identity, num_inference_steps=4, scale=0.5).json()["id"]
    assert recording.started.wait(DEADLINE)  # at its first step, held
    queued = generate(client, identity, num_inference_steps=3).json()["id"]  # another size of batch: waits
    # face analysis does not wait behind generation
    assert enroll(client, faces_dir, "biden.jpg").status_code == 201
    # a request's defaults are the server's, not the running job's (its scale 0.5 is the adapter's during its call)
    assert client.get(f"/v1/generations/{queued}").json()["settings"]["scale"] == 1.0

    view = client.delete(f"/v1/generations/{queued}").json()
    assert view["status"] == "cancelled"  # at once
    assert [kind for kind, _ in events(client, queued)] == ["queued", "cancelled"]

    assert client.delete(f"/v1/generations/{running}").json()["status"] == "running"  # stops at its next step
    recording.go.set()
    view = wait_finished(client, running)
    assert view["status"] == "cancelled" and view["images"] == [] and view["progress"]["step"] < 4
    error(client.delete(f"/v1/generations/{running}"), 409, "conflict", "already cancelled")
    assert len(recording.calls) == 1  # the queued one never ran
    metrics = client.get("/metrics").text
    assert 'faceid_jobs_finished_total{status="cancelled"} 2.0' in metrics


# ---------------------------------------------------------------------- listing and deleting generations
@both_databases
def test_list_generations_newest_first_in_pages(make_client, faces_dir):
    client = make_client(api_keys=("key-a", "key-b"), start_workers=False)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    identity = enroll(client, faces_dir, "obama.jpg", headers=a).json()["id"]
    jobs = [generate(client, identity, headers=a, seed=seed).json()["id"] for seed in range(5)]
    pages, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/generations", params=params, headers=a).json()
        pages.append([view["id"] for view in page["generations"]])
        for view in page["generations"]:  # each the same view as GET /v1/generations/{id}
            assert view == client.get(f"/v1/generations/{view['id']}", headers=a).json()
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [jobs[4:2:-1], jobs[2:0:-1], jobs[:1]]  # newest first, 2 a page, nothing twice
    first = client.get("/v1/generations", headers=a).json()
    assert [v["id"] for v in first["generations"]] == jobs[::-1] and first["next_cursor"] is None
    assert first["generations"][0]["status"] == "queued" and first["generations"][0]["queue_position"] == 4
    assert client.get("/v1/generations", headers=b).json() == {"generations": [], "next_cursor": None}
    error(client.get("/v1/generations"), 401, "unauthorized")
    error(client.get("/v1/generations", params={"limit": 0}, headers=a), 422, "invalid_request", "limit")
    error(client.get("/v1/generations", params={"limit": 101}, headers=a), 422, "invalid_request", "limit")
    error(client.get("/v1/generations", params={"cursor": "../x"}, headers=a), 422, "invalid_request", "next_cursor")


@both_databases
def test_delete_images_and_generations(make_client, faces_dir, tmp_path):
    client = make_client(api_keys=("key-a", "key-b"))
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    images = tmp_path / "data" / "images"
    prompt = "a photo of quetzalcoatl-the-unique"
    identity = enroll(client, faces_dir, "obama.jpg", headers=a).json()["id"]
    done = generate(client, identity, headers=a, prompt=prompt, num_images_per_prompt=2).json()["id"]
    view = wait_finished(client, done, headers=a)
    kept, dropped = view["images"]
    assert files_under(images) == sorted(url.split("/")[-1] for url in view["images"])

    # another key: 404 for everything, and nothing is deleted
    error(client.delete(dropped, headers=b), 404, "not_found")
    error(client.delete(f"/v1/generations/{done}", params={"purge": "true"}, headers=b), 404, "not_found")
    assert len(files_under(images)) == 2

    # one image: its PNG and row go, its generation lists the other
    assert client.delete(dropped, headers=a).status_code == 204
    assert files_under(images) == [kept.split("/")[-1]]
    error(client.get(dropped, headers=a), 404, "not_found")
    error(client.delete(dropped, headers=a), 404, "not_found")
    after = client.get(f"/v1/generations/{done}", headers=a).json()
    assert after["images"] == [kept] and after["image_index"] == [0]  # the kept one is still image 0 (its seed)

    # a finished generation: DELETE still only cancels (409); ?purge=true deletes it
    error(client.delete(f"/v1/generations/{done}", headers=a), 409, "conflict", "already done", "purge=true")
    client.app.state.service.queue.set_paused(True)
    queued = generate(client, identity, headers=a, prompt=prompt).json()["id"]
    purge = {"purge": "true"}
    error(client.delete(f"/v1/generations/{queued}", params=purge, headers=a), 409, "conflict", "cancel it first")
    assert client.delete(f"/v1/generations/{queued}", headers=a).json()["status"] == "cancelled"
    for job in (done, queued):
        assert client.delete(f"/v1/generations/{job}", params=purge, headers=a).status_code == 204
        error(client.get(f"/v1/generations/{job}", headers=a), 404, "not_found")
        error(client.delete(f"/v1/generations/{job}", params=purge, headers=a), 404, "not_found")
    assert files_under(images) == []
    error(client.get(kept, headers=a), 404, "not_found")
    assert client.get("/v1/generations", headers=a).json()["generations"] == []
    for name in files_under(tmp_path / "data"):  # the prompt is gone from the database file and its log too
        assert prompt.encode() not in (tmp_path / "data" / name).read_bytes(), name
    assert client.get(f"/v1/identities/{identity}", headers=a).status_code == 200  # the person stays


# ---------------------------------------------------------------------- batching
def test_compatible_jobs_share_one_pipeline_call(make_client, faces_dir, pipe):
    recording = Recording(pipe)
    client = make_client(pipeline=recording, start_workers=False, max_batch=4)
    obama = enroll(client, faces_dir, "obama.jpg").json()["id"]
    biden = enroll(client, faces_dir, "biden.jpg").json()["id"]
    a = generate(client, obama, prompt="a photo of a person", seed=11).json()["id"]
    b = generate(client, biden, prompt="an oil painting of a person", num_images_per_prompt=1, seed=[22]).json()["id"]
    c = generate(client, obama, guidance_scale=5.0, seed=33).json()["id"]  # another guidance: its own call
    client.app.state.service.queue.set_paused(False)
    views = {job: wait_finished(client, job) for job in (a, b, c)}
    assert all(v["status"] == "done" for v in views.values())
    assert len(recording.calls) == 2
    assert recording.calls[0].prompt == ["a photo of a person", "an oil painting of a person"]
    assert recording.calls[0].seed == [11, 22] and recording.calls[1].seed == [33]

    # Each job got its own images: the same as it gets alone.
    for job, identity, prompt, seed in ((a, obama, "a photo of a person", 11),
                                        (b, biden, "an oil painting of a person", 22)):  # fmt: skip
        alone = generate(client, identity, prompt=prompt, seed=seed).json()["id"]
        alone_view = wait_finished(client, alone)
        batched = np.asarray(png(client.get(views[job]["images"][0])), dtype=int)
        single = np.asarray(png(client.get(alone_view["images"][0])), dtype=int)
        # identical here (CPU, fp32); 1 level of 255 allows kernels whose sums depend on the batch size
        assert np.abs(batched - single).max() <= 1
    assert len(recording.calls) == 4


# ---------------------------------------------------------------------- who may see what
@both_databases
def test_api_keys_separate_owners(make_client, faces_dir):
    client = make_client(api_keys=("key-a", "key-b"))
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    error(client.get("/v1/identities"), 401, "unauthorized", "Authorization: Bearer")
    error(client.get("/v1/identities", headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    error(client.get("/metrics"), 401, "unauthorized")
    assert client.get("/health").status_code == 200

    identity = enroll(client, faces_dir, "obama.jpg", headers=a).json()
    job = generate(client, identity["id"], headers=a).json()["id"]
    view = wait_finished(client, job, headers=a)
    assert view["status"] == "done"
    image = view["images"][0]
    crop = identity["faces"][0]["crop_url"]

    for method, url in (
        ("GET", f"/v1/identities/{identity['id']}"),
        ("GET", crop),
        ("GET", f"/v1/generations/{job}"),
        ("GET", f"/v1/generations/{job}/events"),
        ("DELETE", f"/v1/generations/{job}"),
        ("GET", image),
        ("DELETE", f"/v1/identities/{identity['id']}"),
    ):
        error(client.request(method, url, headers=b), 404, "not_found")
    assert client.get("/v1/identities", headers=b).json() == []
    error(generate(client, identity["id"], headers=b), 404, "not_found")  # B cannot use A's face
    # A still has everything
    assert client.get(crop, headers=a).status_code == 200 and client.get(image, headers=a).status_code == 200
    assert len(client.get("/v1/identities", headers=a).json()) == 1


def test_keys_file_and_bind_rules(tmp_path):
    from faceid.errors import FaceIDError
    from faceid.service.config import check_bind, read_api_keys

    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nkey-1\n\nkey-2\n")
    assert read_api_keys(["key-0"], keys) == ("key-0", "key-1", "key-2")
    check_bind("127.0.0.1", (), False)
    check_bind("0.0.0.0", ("k",), False)
    check_bind("0.0.0.0", (), True)
    with pytest.raises(FaceIDError, match="--api-key"):
        check_bind("0.0.0.0", (), False)


def test_serve_refuses_bad_setups_before_writing(tmp_path, capsys):
    from faceid.cli import main

    data = str(tmp_path / "d")
    assert main(["serve", "--host", "0.0.0.0", "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert "without authentication" in err and "--insecure-no-auth" in err
    assert main(["serve", "--data-dir", data, "--api-keys-file", str(tmp_path / "none.txt")]) == 2
    assert "API keys file not found" in capsys.readouterr().err
    incomplete = tmp_path / "models"
    incomplete.mkdir()
    assert main(["serve", "--data-dir", data, "--face-models", str(incomplete)]) == 2
    assert capsys.readouterr().err.startswith("faceid: error: ")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------- deleting biometric data
@both_databases
def test_delete_identity_leaves_no_trace(make_client, faces_dir, tmp_path):
    client = make_client()
    data = tmp_path / "data"
    identity = enroll(client, faces_dir, "obama.jpg", "obama2.jpg", name="zebulon-the-unique").json()
    mine = [f for f in files_under(data) if identity["id"] in f]
    assert len(mine) == 6  # photo, crop, embedding (npz) for each photo
    assert client.delete(f"/v1/identities/{identity['id']}").status_code == 204
    left = files_under(data)
    assert not [f for f in left if identity["id"] in f], left
    assert all(f.startswith("faceid.db") for f in left), left  # nothing but the database
    for name in left:  # not even in the database file's free pages or its log
        assert b"zebulon-the-unique" not in (data / name).read_bytes()
    error(client.get(f"/v1/identities/{identity['id']}"), 404, "not_found")
    error(client.get(identity["faces"][0]["crop_url"]), 404, "not_found")
    error(client.delete(f"/v1/identities/{identity['id']}"), 404, "not_found")


# ---------------------------------------------------------------------- nothing lost
@both_databases
def test_restart_requeues_queued_and_running_jobs(make_client, faces_dir, tmp_path):
    first = make_client(start_workers=False)
    kept = enroll(first, faces_dir, "obama.jpg").json()["id"]
    gone = enroll(first, faces_dir, "biden.jpg").json()["id"]
    queued = generate(first, kept, seed=1).json()["id"]
    running = generate(first, kept, seed=2).json()["id"]
    orphan = generate(first, gone, seed=3).json()["id"]
    first.app.state.service.store.update_job(running, status="running", started=time.time())  # killed mid-run
    assert first.delete(f"/v1/identities/{gone}").status_code == 204
    make_client.close(first)  # the server goes away with its jobs unfinished

    second = make_client()  # a new server on the same data dir
    for job in (queued, running):
        view = wait_finished(second, job)
        assert view["status"] == "done" and len(view["images"]) == 1, view
    view = wait_finished(second, orphan)
    assert view["status"] == "failed" and "deleted" in view["error"] and "enroll" in view["error"]
    # a job's events are in the database: those of the first server too
    assert [kind for kind, _ in events(second, orphan)] == ["queued", "failed"]


@both_databases
def test_only_jobs_of_worker_processes_that_are_gone_are_queued_again(make_client, faces_dir):
    """Several processes share the queue: a job another process runs stays its own while its heartbeat is fresh
    (even on this server's start); it is queued again once that heartbeat is older than the lease, or at once when
    that process, on this machine, has exited."""
    client = make_client(start_workers=False, lease_seconds=30.0)
    service = client.app.state.service
    store = service.store
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    jobs = [generate(client, identity, seed=s).json()["id"] for s in range(3)]
    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    workers = {"elsewhere": ("another-host", 1), "stale": ("another-host", 2), "exited": (here, dead.pid)}
    for (name, (host, pid)), job in zip(workers.items(), jobs, strict=True):
        store.beat(name, host, pid)
        store.update_job(job, status="running", worker=name)
    with store.session() as s:  # the stale one's last heartbeat, a minute ago
        from faceid.service.store import WorkerProcess

        s.get(WorkerProcess, "stale").heartbeat -= 60
    service.requeue_orphans()
    assert [store.job(job).status for job in jobs] == ["running", "queued", "queued"]
    assert store.job(jobs[0]).worker == "elsewhere" and store.job(jobs[1]).worker is None
    service.requeue_orphans()  # noticed again (by another process): nothing changes
    assert [store.job(job).status for job in jobs] == ["running", "queued", "queued"]


def test_job_of_a_deleted_identity_fails_saying_so(make_client, faces_dir):
    client = make_client(start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    job = generate(client, identity).json()["id"]
    assert client.delete(f"/v1/identities/{identity}").status_code == 204
    client.app.state.service.queue.set_paused(False)
    view = wait_finished(client, job)
    assert view["status"] == "failed" and "was deleted" in view["error"] and "enroll" in view["error"]


def test_a_broken_file_fails_its_job_not_the_worker(make_client, faces_dir, tmp_path):
    client = make_client(start_workers=False)
    broken = enroll(client, faces_dir, "obama.jpg").json()["id"]
    fine = enroll(client, faces_dir, "biden.jpg").json()["id"]
    (tmp_path / "data" / "identities" / broken / "face_0.npz").write_bytes(b"not an npz file")
    jobs = [generate(client, identity, seed=1).json()["id"] for identity in (broken, fine, broken, fine)]
    client.app.state.service.queue.set_paused(False)
    views = [wait_finished(client, job) for job in jobs]
    assert [v["status"] for v in views] == ["failed", "done", "failed", "done"]
    assert "internal error" in views[0]["error"] and "server log" in views[0]["error"]


def test_stopping_while_a_job_runs_keeps_it_for_the_next_start(make_client, faces_dir, pipe):
    recording = Recording(pipe, hold=True)
    first = make_client(pipeline=recording)
    identity = enroll(first, faces_dir, "obama.jpg").json()["id"]
    job = generate(first, identity, seed=4).json()["id"]
    assert recording.started.wait(DEADLINE)
    release = threading.Timer(0.3, recording.go.set)  # the step ends after the server began to stop
    release.start()
    make_client.close(first)  # a graceful stop: the job stops at its next step
    release.join()
    second = make_client()
    view = wait_finished(second, job)
    assert view["status"] == "done" and view["settings"]["seed"] == [4]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@both_databases
def test_killed_server_loses_no_job(tmp_path, tiny_models, face_models_dir, faces_dir, make_client, database):
    """A real `faceid serve` process, SIGKILLed while a job runs; a new server on its data dir (and database)
    finishes the job."""
    import httpx

    port = _free_port()
    data = tmp_path / "data"
    command = [sys.executable, "-m", "faceid.cli", "serve", "--port", str(port), "--data-dir", str(data),
               "--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors")),
               "--face-models", str(face_models_dir), "--device", "cpu", "--max-steps", "1000"]  # fmt: skip
    if database.url(data) is not None:
        command += ["--database-url", database.url(data)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=30) as http:
            identity = enroll(http, faces_dir, "obama.jpg").json()["id"]
            job = generate(http, identity, num_inference_steps=150, seed=9).json()["id"]
            while time.monotonic() < deadline:
                view = http.get(f"/v1/generations/{job}").json()
                if view["status"] == "running" and view["progress"]["step"] >= 1:
                    break
                time.sleep(0.05)
            assert view["status"] == "running", view
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
        server.stderr.close()
    client = make_client(data_dir=data)
    view = wait_finished(client, job)
    assert view["status"] == "done" and view["settings"]["seed"] == [9], view


class ShowingFaces:
    """The pipeline, with each image it makes replaced by a real face photo of the same size (in turn): the
    service's scoring then has faces to find. Everything else is the pipeline's own."""

    def __init__(self, pipe, photos) -> None:
        self.wrapped = pipe
        self.photos = photos

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def __call__(self, *args, **kwargs):
        result = self.wrapped(*args, **kwargs)
        result.images = [
            Image.open(self.photos[i % len(self.photos)]).convert("RGB").resize(image.size)
            for i, image in enumerate(result.images)
        ]
        return result


def test_every_image_is_scored_as_faceid_score_scores_it(
    make_client, pipe, analyzer, faces_dir, face_models_dir, tmp_path
):
    from faceid.cli import main
    from faceid.scoring import IdentityScorer

    shown = [faces_dir / "obama2.jpg", faces_dir / "biden.jpg"]
    client = make_client(pipeline=ShowingFaces(pipe, shown))
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    job = generate(client, identity, num_images_per_prompt=2, width=128, height=128, num_inference_steps=1).json()
    view = wait_finished(client, job["id"])
    assert view["status"] == "done" and len(view["scores"]) == 2
    folder = tmp_path / "made"
    folder.mkdir()
    for k, url in enumerate(view["images"]):
        (folder / f"{k}.png").write_bytes(client.get(url).content)
    rows = tmp_path / "rows.jsonl"
    code = main(["score", str(folder), "--face", str(faces_dir / "obama.jpg"), "--recognizers", "arcface",
                 "--no-clip", "--face-models", str(face_models_dir), "--out", str(rows)])  # fmt: skip
    assert code == 0
    scored = {Path(r["path"]).name: r for r in map(json.loads, rows.read_text().splitlines())}
    for k, score in enumerate(view["scores"]):
        assert score["recognizer"] == IdentityScorer(analyzer).name  # the server's (arcface with buffalo_l)
        assert score["people"][0]["identity_id"] == identity
        assert not score["people"][0]["no_face"]
        row = scored[f"{k}.png"]
        assert score["similarity"] == pytest.approx(row["similarity"][score["recognizer"]], abs=1e-4)
    # the same person scores higher than another one (the recognizer is the stand-in's, but it tells them apart)
    assert view["scores"][0]["similarity"] > view["scores"][1]["similarity"]

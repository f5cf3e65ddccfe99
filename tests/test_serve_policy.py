"""``faceid serve``'s request policy (``faceid.service.policy``): text that is not text refused at the door, one bad
job never failing its batch, a stored row that cannot be shown never breaking a listing, Host and Origin checks (DNS
rebinding, cross-site requests), defaults within the server's limits, 413s with the true size, quotas per key; each
refusal counted by /metrics. On the tiny SD1.5 model and the real photos, through FastAPI's TestClient (and one
`faceid serve` built by the real command line)."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from bad_files import jpeg_bytes
from conftest import both_databases
from PIL import Image

pytest.importorskip("fastapi")
import test_serve  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import TINY, Recording, enroll, error, files_under, generate, wait_finished  # noqa: E402

from faceid.service.policy import bound_hosts, megabytes, within_limits  # noqa: E402
from faceid.settings import GenerationSettings  # noqa: E402

make_client = test_serve.make_client  # the fixture: a started TestClient on an app in tmp_path/data
KEY_A, KEY_B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def png_bytes(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def raw_json(client, body: dict, headers=None):
    """POST /v1/generations with ``body`` as JSON with \\u escapes: how a lone surrogate travels (valid JSON)."""
    return client.post(
        "/v1/generations",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def refusals(client, headers=None) -> dict[str, float]:
    text = client.get("/metrics", headers=headers).text
    return {m[1]: float(m[2]) for m in re.finditer(r'faceid_refusals_total\{reason="(\w+)"\} ([0-9.]+)', text)}


# ---------------------------------------------------------------------- text
def test_text_that_is_not_text_is_refused_before_anything_is_stored(make_client, faces_dir, tmp_path):
    client = make_client(api_keys=("key-a", "key-b"), start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg", headers=KEY_A).json()["id"]
    base = {"identity_id": identity, **TINY}
    # a batch-mate of another key: before, the bad job failed every job batched with it
    other = enroll(client, faces_dir, "biden.jpg", headers=KEY_B).json()["id"]
    kept = generate(client, other, headers=KEY_B, seed=1)
    assert kept.status_code == 202, kept.text
    before = files_under(tmp_path / "data")

    for body, words in (
        ({"prompt": "x \ud800"}, ["prompt", "character 3", "lone surrogate", "U+D800"]),
        ({"prompt": ["fine", "a\x00b"], "identity_ids": None}, ["prompt", "[1]", "U+0000"]),
        ({"prompt": "fine", "negative_prompt": "bell\x07"}, ["negative_prompt", "U+0007", "control character"]),
        ({"prompt": "fine", "base_model": "m\x1b"}, ["base_model", "U+001B"]),
        ({"prompt": "fine", "loras": {"style\x7f.safetensors": 0.5}}, ["loras", "U+007F"]),
        ({"prompt": "fine", "init_image": "\udc80" * 32}, ["init_image", "lone surrogate"]),
        ({"prompt": "fine", "controls": [{"kind": "canny", "image": "ab\x00"}]}, ["controls", "[0].image", "U+0000"]),
        ({"prompt": "fine", "identity_id": identity + "\x00"}, ["identity_id", "U+0000"]),
    ):
        message = error(raw_json(client, {**base, **body}, KEY_A), 422, "invalid_request", *words)
        assert "\\u" not in message or "U+" in message
    # newlines and tabs are text
    assert raw_json(client, {**base, "prompt": "a photo\nof a\tperson"}, KEY_A).status_code == 202

    # identity names and file names are text too; nothing of a refused request is written
    error(enroll(client, faces_dir, "obama.jpg", headers=KEY_A, name="Bar\x00ack"), 422, "invalid_request", "name")
    multipart = (
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="a\x01b.png"\r\nContent-Type: image/png\r\n\r\n'
        + png_bytes()
        + b"\r\n--x--\r\n"
    )
    response = client.post(
        "/v1/uploads", content=multipart, headers={"Content-Type": "multipart/form-data; boundary=x", **KEY_A}
    )
    error(response, 422, "invalid_request", "file name", "U+0001")
    assert files_under(tmp_path / "data") == before
    assert client.get("/v1/uploads", headers=KEY_A).json() == []

    # the listings and the other key's job are unharmed, and the refusals are counted
    page = client.get("/v1/generations", headers=KEY_A)
    assert page.status_code == 200 and len(page.json()["generations"]) == 1
    client.app.state.service.queue.set_paused(False)
    assert wait_finished(client, kept.json()["id"], headers=KEY_B)["status"] == "done"
    assert refusals(client, KEY_A)["invalid_text"] == 10.0


def test_the_service_checks_text_without_http(make_client, faces_dir):
    """``Service.submit`` (Ray's ingress, Python callers) refuses the same text: the door is not only pydantic's."""
    from faceid.errors import FaceIDError

    client = make_client(start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    with pytest.raises(FaceIDError, match=r"prompt\[0\]: character 2 is a lone surrogate"):
        client.app.state.service.submit("", {"identity_id": identity, "prompt": ["a\ud800"], **TINY})
    assert client.get("/v1/generations").json()["generations"] == []


# ---------------------------------------------------------------------- a batch
def test_only_the_job_at_fault_fails_its_batch(make_client, faces_dir, pipe, monkeypatch):
    """A prompt the text encoder cannot take fails inside the batch's pipeline call: each job runs again alone, the
    others end done with the images they get alone (another key's too)."""
    encode_prompt = pipe.encode_prompt

    def fragile(prompts, negatives, num_images_per_prompt):
        if any("unencodable" in p for p in prompts):
            raise RuntimeError("the tokenizer choked")
        return encode_prompt(prompts, negatives, num_images_per_prompt)

    monkeypatch.setattr(pipe, "encode_prompt", fragile)
    recording = Recording(pipe)
    client = make_client(pipeline=recording, api_keys=("key-a", "key-b"), start_workers=False, max_batch=4)
    mine = enroll(client, faces_dir, "obama.jpg", headers=KEY_A).json()["id"]
    theirs = enroll(client, faces_dir, "biden.jpg", headers=KEY_B).json()["id"]
    good = generate(client, mine, headers=KEY_A, prompt="a photo of a person", seed=1).json()["id"]
    bad = generate(client, theirs, headers=KEY_B, prompt="an unencodable prompt", seed=2).json()["id"]
    other = generate(client, theirs, headers=KEY_B, prompt="an oil painting of a person", seed=3).json()["id"]
    client.app.state.service.queue.set_paused(False)
    views = {job: wait_finished(client, job, headers=key) for job, key in ((good, KEY_A), (bad, KEY_B), (other, KEY_B))}
    assert views[good]["status"] == "done" and views[other]["status"] == "done", views
    assert views[bad]["status"] == "failed" and "tokenizer choked" in views[bad]["error"]
    assert [len(call.prompt) for call in recording.calls] == [3, 1, 1, 1]  # the batch, then each alone

    alone = wait_finished(client, generate(client, mine, headers=KEY_A, prompt="a photo of a person", seed=1).json()["id"],
                          headers=KEY_A)  # fmt: skip
    image = client.get(views[good]["images"][0], headers=KEY_A).content
    assert (
        image == client.get(alone["images"][0], headers=KEY_A).content
        or np.abs(
            np.asarray(Image.open(io.BytesIO(image)), dtype=int)
            - np.asarray(Image.open(io.BytesIO(client.get(alone["images"][0], headers=KEY_A).content)), dtype=int)
        ).max()
        <= 1
    )


# ---------------------------------------------------------------------- stored rows
def test_a_stored_row_that_cannot_be_shown_never_breaks_a_listing(make_client, faces_dir):
    client = make_client(start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    jobs = [generate(client, identity, seed=s).json()["id"] for s in range(3)]
    store = client.app.state.service.store
    with store.engine.begin() as db:  # written straight into the database: JSON that no longer parses, and text
        db.exec_driver_sql("UPDATE jobs SET settings = '{\"prompt\": ' WHERE id = ?", (jobs[0],))  # no response holds
        db.exec_driver_sql('UPDATE jobs SET settings = \'{"prompt": "x \\ud800"}\' WHERE id = ?', (jobs[1],))

    page = client.get("/v1/generations")
    assert page.status_code == 200, page.text
    views = {view["id"]: view for view in page.json()["generations"]}
    assert set(views) == set(jobs)
    for job in jobs[:2]:
        assert views[job]["status"] == "failed" and views[job]["settings"] == {}
        assert (
            "cannot be read" in views[job]["error"]
            and f"DELETE /v1/generations/{job}?purge=true" in views[job]["error"]
        )
        assert client.get(f"/v1/generations/{job}").json() == views[job]  # the one job: the same clear answer
    assert views[jobs[2]]["status"] == "queued" and views[jobs[2]]["settings"]["seed"] == [2]

    # it can be cancelled and deleted like any other
    assert client.delete(f"/v1/generations/{jobs[0]}").json()["status"] == "failed"
    assert client.delete(f"/v1/generations/{jobs[0]}", params={"purge": "true"}).status_code == 204
    error(client.get(f"/v1/generations/{jobs[0]}"), 404, "not_found")

    # a restart fails the unreadable queued job, runs the others, and still lists everything
    make_client.close(client)
    again = make_client()
    assert wait_finished(again, jobs[2])["status"] == "done"
    view = wait_finished(again, jobs[1])
    assert view["status"] == "failed" and "cannot be read" in view["error"]
    assert again.get("/v1/generations").status_code == 200


# ---------------------------------------------------------------------- Host and Origin
def test_host_and_origin_checks(make_client, faces_dir):
    client = make_client()  # without keys, on the loopback names (the test client's port: 80)
    for host in ("localhost", "127.0.0.1", "[::1]", "LOCALHOST.", "localhost:80"):
        assert client.get("/v1/identities", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:80", "localhost:8080", "127.0.0.1.evil.example", "", "a b"):
        message = error(client.get("/v1/identities", headers={"Host": host}), 403, "forbidden_host", "--allowed-host")
        assert "localhost:80" in message
    error(client.get("/", headers={"Host": "rebound.example"}), 403, "forbidden_host")  # the web app, too
    error(client.get("/health", headers={"Host": "rebound.example"}), 403, "forbidden_host")

    # a page of another site may not change anything: multipart needs no preflight
    photos = [("photos", ("obama.jpg", (faces_dir / "obama.jpg").read_bytes(), "image/jpeg"))]
    for origin in ("http://evil.example", "http://localhost:3000", "https://localhost", "null", "file://"):
        response = client.post("/v1/identities", files=photos, headers={"Origin": origin})
        error(response, 403, "forbidden_origin", "Origin", "--allowed-host", "--api-key")
    assert client.get("/v1/identities").json() == []
    assert client.get("/v1/identities", headers={"Origin": "http://evil.example"}).status_code == 200  # reads pass
    identity = client.post("/v1/identities", files=photos, headers={"Origin": "http://localhost"})  # its own page
    assert identity.status_code == 201, identity.text
    assert client.post("/v1/identities", files=photos).status_code == 201  # no Origin: curl, scripts
    job = client.delete(f"/v1/identities/{identity.json()['id']}", headers={"Origin": "http://evil.example"})
    error(job, 403, "forbidden_origin")
    counted = refusals(client)
    assert counted["forbidden_host"] == 8.0 and counted["forbidden_origin"] == 6.0

    # with keys a page has no key: Origin is not checked, Host still is
    keyed = make_client(api_keys=("key-a",), data_dir=client.app.state.service.config.data_dir.parent / "keyed")
    response = keyed.post("/v1/identities", files=photos, headers={"Origin": "http://evil.example", **KEY_A})
    assert response.status_code == 201, response.text
    error(keyed.get("/v1/identities", headers={"Host": "evil.example", **KEY_A}), 403, "forbidden_host")

    # --allowed-host: exactly the names given
    named = make_client(allowed_hosts=("faceid.lan", "*.example.org", "[::1]:8000"),
                        data_dir=client.app.state.service.config.data_dir.parent / "named")  # fmt: skip
    for host in ("faceid.lan", "faceid.lan:1234", "a.example.org", "[::1]:8000"):
        assert named.get("/v1/identities", headers={"Host": host}).status_code == 200, host
    for host in ("localhost", "example.org", "[::1]:8001"):
        error(named.get("/v1/identities", headers={"Host": host}), 403, "forbidden_host", "faceid.lan")
    headers = {"Host": "faceid.lan", "Origin": "https://faceid.lan"}
    assert named.post("/v1/identities", files=photos, headers=headers).status_code == 201
    headers = {"Host": "faceid.lan", "Origin": "https://a.example.org:8443"}
    assert named.post("/v1/identities", files=photos, headers=headers).status_code == 201
    headers = {"Host": "faceid.lan", "Origin": "http://evil.example"}
    error(named.post("/v1/identities", files=photos, headers=headers), 403, "forbidden_origin")


def test_serve_defaults_answer_their_own_names_only(tmp_path, tiny_models, face_models_dir, faces_dir, monkeypatch):
    """``faceid serve``'s real defaults: a loopback bind answers 127.0.0.1, localhost and [::1] on its port only."""
    import uvicorn

    from faceid.cli import main

    assert bound_hosts("127.0.0.1", 7860) == ("127.0.0.1:7860", "localhost:7860", "[::1]:7860")
    assert bound_hosts("::1", 80, ["faceid.lan"]) == ("127.0.0.1:80", "localhost:80", "[::1]:80", "faceid.lan")
    assert bound_hosts("0.0.0.0", 7860) == ("*",)  # needs keys or --insecure-no-auth; names unknown to it
    assert bound_hosts("::", 7860, ["a.lan:80"]) == ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "a.lan:80")
    assert bound_hosts("192.168.1.5", 7860) == ("192.168.1.5:7860",)

    captured = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: captured.append((app, kwargs)))
    common = ["serve", "--base-model", str(tiny_models.sd15), "--adapter", str(tiny_models.adapter("faceid", "safetensors")),
              "--face-models", str(face_models_dir), "--device", "cpu", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    assert main([*common, "--port", "7861"]) == 0
    app, kwargs = captured[-1]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 7861
    config = app.state.service.config
    assert config.allowed_hosts == ("127.0.0.1:7861", "localhost:7861", "[::1]:7861")
    assert (config.max_identities, config.max_uploads, config.max_stored_bytes, config.max_queued_per_key) == (
        1000, 1000, 10 * 1024**3, None)  # fmt: skip
    photos = [("photos", ("obama.jpg", (faces_dir / "obama.jpg").read_bytes(), "image/jpeg"))]
    with TestClient(app, base_url="http://127.0.0.1:7861") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "localhost:7861"}).status_code == 200
        for host in ("localhost:7860", "localhost", "attacker.example:7861"):
            error(client.get("/health", headers={"Host": host}), 403, "forbidden_host")
        response = client.post("/v1/identities", files=photos, headers={"Origin": "http://attacker.example"})
        error(response, 403, "forbidden_origin")
        response = client.post("/v1/identities", files=photos, headers={"Origin": "http://127.0.0.1:7861"})
        assert response.status_code == 201, response.text

    assert main([*common, "--port", "7862", "--allowed-host", "faceid.lan", "--max-identities", "0",
                 "--max-stored-mb", "5", "--max-queued-per-key", "2"]) == 0  # fmt: skip
    config = captured[-1][0].state.service.config
    assert config.allowed_hosts[-1] == "faceid.lan" and config.max_identities is None
    assert (config.max_stored_bytes, config.max_queued_per_key) == (5 * 1024 * 1024, 2)
    with pytest.raises(SystemExit):
        main([*common, "--allowed-host", "a b/c"])


# ---------------------------------------------------------------------- defaults and limits
def test_defaults_are_the_models_within_the_servers_limits(make_client, faces_dir):
    client = make_client(max_steps=4, max_side=256, start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    body = {"identity_id": identity, "prompt": "a photo of a person"}  # what the web app sends, steps left empty
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    settings = client.get(f"/v1/generations/{response.json()['id']}").json()["settings"]
    # SD1.5's 30 steps and 512x768, within 4 steps and 256 px: its aspect kept, in multiples of 8
    assert (settings["num_inference_steps"], settings["width"], settings["height"]) == (4, 168, 256)
    # and /v1/models states those defaults (what the web app shows as "default")
    defaults = client.get("/v1/models").json()["defaults"]
    assert (defaults["num_inference_steps"], defaults["width"], defaults["height"]) == (4, 168, 256)
    response = client.post("/v1/generations", json={**body, "width": 128})
    settings = client.get(f"/v1/generations/{response.json()['id']}").json()["settings"]
    assert (settings["width"], settings["height"]) == (128, 256)
    # what is given stays a 422 over the limit
    error(client.post("/v1/generations", json={**body, "num_inference_steps": 5}), 422, "limit_exceeded", "at most 4")
    error(client.post("/v1/generations", json={**body, "height": 264}), 422, "limit_exceeded", "height")
    # a swap's default resolution too (the family's 512)
    target = client.post("/v1/uploads", files={"image": ("t.jpg", (faces_dir / "biden.jpg").read_bytes())}).json()
    response = client.post("/v1/generations", json={**body, "swap": {"target": target["id"]}})
    view = client.get(f"/v1/generations/{response.json()['id']}").json()
    assert view["inputs"]["swap"]["resolution"] == 256 and view["settings"]["num_inference_steps"] == 4

    config = SimpleNamespace(max_steps=100, max_side=512)  # an SDXL-sized default of another aspect
    given = GenerationSettings()
    resolved = GenerationSettings(width=1024, height=768, num_inference_steps=30)
    assert within_limits(given, resolved, config).model_dump(include={"width", "height"}) == {
        "width": 512,
        "height": 384,
    }


def test_413_says_the_true_size(make_client, faces_dir):
    limit = 1024 * 1024
    client = make_client(max_upload_bytes=limit, max_photos=4)
    big = jpeg_bytes(np.zeros((64, 64, 3), np.uint8))
    big += b"\0" * (3 * limit - len(big))  # a 3 MB photo: within the request's limit (4 photos), over one photo's
    response = client.post("/v1/identities", files=[("photos", ("big.jpg", big, "image/jpeg"))])
    message = error(response, 413, "limit_exceeded", "photos[0] ('big.jpg') (3 MB) is larger than", "(1 MB an image")
    assert "1.0 MB" not in message
    # a body over its path's limit: its Content-Length, when it has one
    response = client.post("/v1/uploads", files={"image": ("big.jpg", big, "image/jpeg")})
    length = int(response.request.headers["content-length"])
    error(response, 413, "limit_exceeded", f"the request body ({megabytes(length)}) is larger than", "/v1/uploads")
    # the service itself, given all the bytes: their size; given one byte over the limit (a route's read): "larger"
    service = client.app.state.service
    with pytest.raises(Exception, match=r"image \('x.png'\) \(2 MB\) is larger than"):
        service.add_upload("", "x.png", b"\0" * (2 * limit))
    with pytest.raises(Exception, match=r"image \('x.png'\) is larger than this server takes \(1 MB"):
        service.add_upload("", "x.png", b"\0" * (limit + 1))


# ---------------------------------------------------------------------- quotas
@both_databases
def test_quotas_per_key(make_client, faces_dir):
    client = make_client(api_keys=("key-a", "key-b"), max_identities=1, max_uploads=1, max_queued_per_key=1,
                         start_workers=False)  # fmt: skip
    identity = enroll(client, faces_dir, "obama.jpg", headers=KEY_A).json()["id"]
    error(enroll(client, faces_dir, "biden.jpg", headers=KEY_A), 429, "quota_exceeded", "1 identities",
          "--max-identities 1", "DELETE /v1/identities/")  # fmt: skip
    other = enroll(client, faces_dir, "biden.jpg", headers=KEY_B)  # another key's quota
    assert other.status_code == 201

    upload = client.post("/v1/uploads", files={"image": ("a.png", png_bytes())}, headers=KEY_A).json()["id"]
    error(client.post("/v1/uploads", files={"image": ("b.png", png_bytes())}, headers=KEY_A), 429, "quota_exceeded",
          "--max-uploads 1", "DELETE /v1/uploads/")  # fmt: skip
    assert client.delete(f"/v1/uploads/{upload}", headers=KEY_A).status_code == 204  # deleting frees it
    assert client.post("/v1/uploads", files={"image": ("b.png", png_bytes())}, headers=KEY_A).status_code == 201

    job = generate(client, identity, headers=KEY_A, seed=1).json()["id"]
    refused = generate(client, identity, headers=KEY_A, seed=2)
    error(refused, 429, "quota_exceeded", "1 generations waiting", "--max-queued-per-key 1")
    assert int(refused.headers["Retry-After"]) >= 1
    assert generate(client, other.json()["id"], headers=KEY_B).status_code == 202
    assert client.delete(f"/v1/generations/{job}", headers=KEY_A).json()["status"] == "cancelled"
    assert generate(client, identity, headers=KEY_A, seed=3).status_code == 202

    assert client.delete(f"/v1/identities/{identity}", headers=KEY_A).status_code == 204
    assert enroll(client, faces_dir, "biden.jpg", headers=KEY_A).status_code == 201
    counted = refusals(client, KEY_A)
    assert counted["quota_identities"] == 1.0 and counted["quota_uploads"] == 1.0 and counted["quota_queued"] == 1.0


@both_databases
def test_stored_bytes_quota_counts_photos_uploads_and_images(make_client, faces_dir):
    client = make_client()
    service = client.app.state.service
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    stored = service.policy.stored_bytes("")
    assert stored > 0
    view = wait_finished(client, generate(client, identity, num_images_per_prompt=2).json()["id"])
    with_images = service.policy.stored_bytes("")
    assert with_images > stored  # the generated images count

    service.config.max_stored_bytes = with_images + 10  # the quota read when a request comes
    response = client.post("/v1/uploads", files={"image": ("a.png", png_bytes())})
    message = error(response, 413, "quota_exceeded", "--max-stored-mb", "DELETE /v1/images/", "upload again")
    assert megabytes(with_images) in message
    assert client.get("/v1/uploads").json() == []
    assert generate(client, identity).status_code == 202  # under the quota: its images may pass it
    service.config.max_stored_bytes = with_images - 1
    error(generate(client, identity), 413, "quota_exceeded", "submit again")
    for url in view["images"]:  # deleting images frees their bytes
        assert client.delete(url).status_code == 204
    assert service.policy.stored_bytes("") < with_images
    assert client.post("/v1/uploads", files={"image": ("a.png", png_bytes())}).status_code == 201
    assert refusals(client)["quota_stored_bytes"] == 2.0


def test_every_refusal_reason_is_in_metrics_and_a_full_queue_counts(make_client, faces_dir):
    client = make_client(max_queue=1, start_workers=False)
    counted = refusals(client)
    assert set(counted) == {"forbidden_host", "forbidden_origin", "invalid_text", "queue_full", "quota_identities",
                            "quota_uploads", "quota_stored_bytes", "quota_queued"}  # fmt: skip
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    assert generate(client, identity).status_code == 202
    error(generate(client, identity), 429, "queue_full")
    assert refusals(client)["queue_full"] == 1.0

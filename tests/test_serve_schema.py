"""``faceid serve``'s ``/openapi.json`` tells the truth: the one error body for every status a route gives, binary
uploads and PNGs, readable operation ids and typed responses; an API fuzzer (schemathesis) finds no answer that
differs from it on a live server, with and without API keys; and a client generated from it by
openapi-python-client enrolls, generates, polls and downloads with no hand edits. Real uvicorn servers on loopback
on the tiny models and the real photos."""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
import requests  # noqa: E402
import uvicorn  # noqa: E402
from test_serve import DEADLINE, TINY  # noqa: E402
from test_webapp import free_port  # noqa: E402

from faceid.service import ServeConfig, create_app  # noqa: E402
from faceid.settings import GenerationSettings  # noqa: E402

KEY = "schema-test-key"
ERROR_REF = "#/components/schemas/ErrorBody"
# The route functions: each operation's id is its function's name.
OPERATIONS = {
    "create_identity", "list_identities", "get_identity", "get_crop", "delete_identity", "create_upload",
    "list_uploads", "get_upload_image", "get_upload", "delete_upload", "create_generation", "list_generations",
    "get_generation", "cancel_generation", "generation_events", "get_control_image", "get_image", "delete_image",
    "models", "health", "metrics",
    # the OpenAI API
    "openai_list_models", "openai_create_image", "openai_edit_image", "openai_create_transcription", "openai_get_image",
    # the AUTOMATIC1111 API
    "a1111_list_checkpoints", "a1111_get_options", "a1111_set_options", "a1111_list_samplers", "a1111_list_schedulers",
    "a1111_list_scripts", "a1111_list_sd_vae", "a1111_list_loras", "a1111_list_prompt_styles", "a1111_list_upscalers",
    "a1111_list_latent_upscale_modes", "a1111_list_embeddings", "a1111_ping", "a1111_progress", "a1111_interrupt",
    "a1111_txt2img", "a1111_img2img",
}  # fmt: skip
# Each protocol's error body, by path; and the routes that take no key (health; a signed image link)
ERROR_BODIES = {"/openai/": "OpenAIErrorBody", "/sdapi/": "A1111ErrorBody", "/internal/": "A1111ErrorBody"}
KEYLESS = {"health", "openai_get_image"}
# The fuzz: a fixed seed (derandomized), a few cases per operation and generation mode.
FUZZ_EXAMPLES = {"positive": 25, "negative": 10}


def needs(module: str):
    """A test dependency of the ``test`` extra: its absence fails the test, saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"this test needs {module}: pip install -e '.[test]' (it pins schemathesis, openapi-python-client)")


@contextlib.contextmanager
def serving(config: ServeConfig):
    """A real uvicorn server (in a thread) on 127.0.0.1; its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(DEADLINE)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, pipe, analyzer):
    """No keys, workers paused: what the fuzzer queues stays queued (it costs nothing, and starts nothing)."""
    config = ServeConfig(
        data_dir=tmp_path_factory.mktemp("open"),
        pipeline=pipe,
        analyzer=analyzer,
        start_workers=False,
        max_queue=40,
        sync_timeout=0.5,  # the protocols' requests wait for a job that never runs: a 504 at once
    )
    with serving(config) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, pipe, analyzer):
    """With an API key, workers running on the tiny model, small limits: what the fuzzer queues runs in a moment."""
    config = ServeConfig(
        data_dir=tmp_path_factory.mktemp("keyed"),
        pipeline=pipe,
        analyzer=analyzer,
        api_keys=(KEY,),
        max_queue=4,
        max_steps=2,
        max_side=64,
        max_images=2,
        sync_timeout=30,
    )
    with serving(config) as url:
        yield url


@pytest.fixture(scope="module")
def schema(open_server) -> dict:
    return requests.get(f"{open_server}/openapi.json", timeout=DEADLINE).json()


def operations(schema: dict):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def ref(content: dict, media: str = "application/json") -> str | None:
    return content.get("content", {}).get(media, {}).get("schema", {}).get("$ref")


# ---------------------------------------------------------------------------------------------- the schema
def test_every_error_status_is_declared_with_the_body_sent(schema):
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])
    error = schema["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"code", "message"}
    declared = {}
    for path, method, operation in operations(schema):
        statuses = {int(status) for status in operation["responses"]}
        body = next((b for prefix, b in ERROR_BODIES.items() if path.startswith(prefix)), "ErrorBody")
        for status in statuses - {200, 201, 202, 204}:
            assert ref(operation["responses"][str(status)]) == f"#/components/schemas/{body}", (path, method, status)
        declared[operation["operationId"]] = statuses
        assert {403, 500} <= statuses, (path, method)
        if operation["operationId"] not in KEYLESS:
            assert 401 in statuses, (path, method)  # every route but these takes the key
        invalid = 400 if path.startswith("/openai/") else 422  # OpenAI answers an invalid request with 400
        if "{" in path:
            assert {404, invalid} <= statuses, (path, method)
        if method == "post" and "requestBody" in operation:
            assert {400, 413, invalid} <= statuses, (path, method)
    assert {400, 429} <= declared["create_identity"] and {400, 429} <= declared["create_upload"]
    assert 429 in declared["create_generation"] and 409 in declared["cancel_generation"]
    assert 401 not in declared["health"]


def test_uploads_and_pngs_are_binary_and_operation_ids_are_the_route_names(schema):
    ids = [operation["operationId"] for _, _, operation in operations(schema)]
    assert sorted(ids) == sorted(OPERATIONS), ids
    components = schema["components"]["schemas"]
    photos = components["Body_create_identity"]["properties"]["photos"]
    assert photos["type"] == "array" and photos["items"]["format"] == "binary", photos
    assert components["Body_create_upload"]["properties"]["image"]["format"] == "binary"
    for path, method, operation in operations(schema):
        if path.endswith(".png") and method == "get":
            assert set(operation["responses"]["200"]["content"]) == {"image/png"}, path
            assert operation["responses"]["200"]["content"]["image/png"]["schema"] == {
                "type": "string",
                "format": "binary",
            }
    events = schema["paths"]["/v1/generations/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert set(events) == {"text/event-stream"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_responses_are_typed(schema):
    def ok(path, method="get", status="200"):
        return ref(schema["paths"][path][method]["responses"][status])

    assert ok("/v1/models") == "#/components/schemas/ModelsView"
    assert ok("/health") == "#/components/schemas/HealthView"
    assert ok("/v1/generations/{job_id}") == "#/components/schemas/JobView"
    components = schema["components"]["schemas"]
    assert components["JobView"]["properties"]["settings"]["$ref"] == "#/components/schemas/JobSettings"
    models = components["ModelsView"]["properties"]
    assert {"configured", "workers", "defaults", "catalog", "modes", "controlnets", "style_adapters"} <= set(models)
    assert "num_inference_steps" in components["JobSettings"]["properties"]


def test_job_settings_read_what_the_server_stores(schema):
    """A job's settings are ``GenerationSettings.to_json()`` (resolved, the unset fields left out): the model reads
    them and shows them unchanged, and they validate against /openapi.json's ``JobSettings``."""
    jsonschema_rs = needs("jsonschema_rs")  # schemathesis's JSON Schema validator
    from faceid.service.inputs import JobInputs
    from faceid.service.schema import JobInputsView, JobSettings

    style = [{"adapter": "plus", "scale": 0.8}, {"adapter": "plus", "region": "mask", "window": (0, 0.5)}]
    resolved = GenerationSettings(
        prompt=["a", "b"], seed=[1, 2], regions=[(0, 0, 0.5, 1), (0.5, 0, 1, 1)], style=style, loras={"x": 0.5}
    ).resolve("SD1.5", scale=1.0)
    stored = resolved.to_json()
    assert JobSettings.model_validate(stored).model_dump(mode="json") == stored
    validator = jsonschema_rs.Draft202012Validator(
        {"$ref": "#/components/schemas/JobSettings", "components": schema["components"]}
    )
    validator.validate(stored)
    assert not validator.is_valid({**stored, "seed": "seven"})
    # A job's inputs likewise (JobInputs.to_json(), nested models without their unset fields).
    upload = "2e4858a789fa477c92eb0aa331c41738"
    inputs = JobInputs.parse({"init_image": upload, "style": [{"image": upload, "adapter": "tiny", "scale": 0.8}]})
    assert JobInputsView.model_validate(inputs.to_json()).model_dump(mode="json") == inputs.to_json()


def test_an_unreadable_body_is_a_400_that_says_what_to_send(open_server, schema):
    """Bytes that are not UTF-8 JSON (what the fuzzer sent first): 400 ``bad_request``, declared, saying what to
    send (FastAPI's own answer was ``http_error``, "There was an error parsing the body", and undeclared)."""
    response = requests.post(
        f"{open_server}/v1/generations", data=b"\xff", headers={"Content-Type": "application/json"}, timeout=DEADLINE
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request" and "Content-Type: application/json" in error["message"], error
    assert "400" in schema["paths"]["/v1/generations"]["post"]["responses"]


def populate(url: str, headers: dict | None, faces_dir, wait: bool) -> dict[str, str]:
    """An identity, an upload and a generation on the server (``wait``: until it is done); their ids, by the
    path parameters that name them."""
    photo = (faces_dir / "obama.jpg").read_bytes()
    enrolled = requests.post(
        f"{url}/v1/identities", files=[("photos", ("obama.jpg", photo, "image/jpeg"))], headers=headers
    )
    assert enrolled.status_code == 201, enrolled.text
    identity = enrolled.json()["id"]
    uploaded = requests.post(f"{url}/v1/uploads", files={"image": ("obama.jpg", photo, "image/jpeg")}, headers=headers)
    assert uploaded.status_code == 201, uploaded.text
    body = {"prompt": "a photo of a person", **TINY, "identity_id": identity, "seed": 3}
    submitted = requests.post(f"{url}/v1/generations", json=body, headers=headers)
    assert submitted.status_code == 202, submitted.text
    ids = {"identity_id": identity, "upload_id": uploaded.json()["id"], "job_id": submitted.json()["id"], "k": "0"}
    deadline = time.monotonic() + DEADLINE
    while wait:
        view = requests.get(f"{url}/v1/generations/{ids['job_id']}", headers=headers).json()
        if view["status"] == "done":
            ids["image_id"] = view["images"][0].split("/")[-1].removesuffix(".png")
            break
        assert view["status"] in ("queued", "running") and time.monotonic() < deadline, view
        time.sleep(0.05)
    return ids


def test_what_the_server_sends_fits_the_schema(keyed_server, faces_dir):
    """A real enrollment and generation, checked against ``/openapi.json`` by schemathesis: the views of a done job,
    its listing, its PNG, /v1/models (its models forbid undeclared keys: a key the service adds without declaring
    it is a 500 here, never dropped), /health, /metrics; and errors (404, 422, 401) with the declared body."""
    schemathesis = needs("schemathesis")
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    loaded = schemathesis.openapi.from_url(f"{keyed_server}/openapi.json")
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = populate(keyed_server, auth, faces_dir, wait=True)
    identity, job, image_id = ids["identity_id"], ids["job_id"], ids["image_id"]
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    for path, parameters, query, status in (
        ("/v1/generations/{job_id}", {"job_id": job}, None, 200),
        ("/v1/generations", {}, None, 200),
        ("/v1/identities/{identity_id}", {"identity_id": identity}, None, 200),
        ("/v1/images/{image_id}.png", {"image_id": image_id}, None, 200),
        ("/v1/models", {}, None, 200),
        ("/health", {}, None, 200),
        ("/metrics", {}, None, 200),
        # Errors: the body sent is the one declared.
        ("/v1/generations/{job_id}", {"job_id": "missing"}, None, 404),
        ("/v1/generations", {}, {"limit": 0}, 422),
        ("/v1/generations", {}, {"cursor": "nonsense"}, 422),
    ):
        case = loaded[path]["GET"].Case(path_parameters=parameters, query=query)
        response = case.call_and_validate(base_url=keyed_server, headers=auth, checks=checks)
        assert response.status_code == status, (path, response.text)
    unauthorized = loaded["/v1/models"]["GET"].Case()
    assert unauthorized.call_and_validate(base_url=keyed_server, checks=checks).status_code == 401
    models = requests.get(f"{keyed_server}/v1/models", headers=auth).json()
    assert models["workers"][0]["loaded"] and models["catalog"][0]["loaded_on"] == [models["workers"][0]["device"]]


# ---------------------------------------------------------------------------------------------- the fuzzer
@pytest.mark.parametrize("keyed", [False, True], ids=["no-keys", "with-keys"])
def test_the_fuzzer_finds_nothing(request, keyed, faces_dir):
    """Every operation, positive and negative cases, a fixed seed: no 5xx, and every status, content type and body
    is one ``/openapi.json`` declares. With keys the fuzzer sends a valid key. Then the reads again, on things that
    exist (an identity, an upload, a generation: done with keys, queued without), and without keys (workers paused:
    nothing runs) generations of a real identity, which the server accepts, queues and lists."""
    schemathesis = needs("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url = request.getfixturevalue("keyed_server" if keyed else "open_server")
    headers = {"Authorization": f"Bearer {KEY}"} if keyed else None
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures, seen = [], []
    session = requests.Session()

    def fuzz(operation, mode: str, examples: int, known: dict | None = None) -> None:
        named = {name: known[name] for name in re.findall(r"{(\w+)}", operation.path) if name in (known or {})}
        strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode), path_parameters=named)

        @given(case=strategy)
        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case):
            if known and operation.method.upper() == "POST" and isinstance(case.body, dict):
                case.body["identity_id"] = known["identity_id"]
            response = case.call_and_validate(base_url=url, session=session, headers=headers, checks=checks)
            seen.append(response.status_code)

        try:
            run()
        except Unsatisfiable:  # negative cases of an operation that takes nothing: there is nothing to break
            assert mode == "negative", operation.label
        except Exception as exc:  # every operation is fuzzed: the report lists all the failures
            failures.append(f"{operation.label} ({mode}): {exc}"[:3000])

    for result in loaded.get_all_operations():
        for mode, examples in FUZZ_EXAMPLES.items():
            fuzz(result.ok(), mode, examples)
    known = populate(url, headers, faces_dir, wait=keyed)
    for result in loaded.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "GET" and "{" in operation.path:
            if operation.path.endswith("/events") and not keyed:
                continue  # the events of a job that stays queued (workers paused) go on until it ends
            fuzz(operation, "positive", FUZZ_EXAMPLES["positive"], known)
        elif operation.label == "POST /v1/generations" and not keyed:
            fuzz(operation, "positive", FUZZ_EXAMPLES["positive"] * 2, known)
    fuzz(loaded["/v1/generations"]["GET"], "positive", FUZZ_EXAMPLES["positive"])  # the listing, with all those
    listed = requests.get(f"{url}/v1/generations", params={"limit": 100}, headers=headers).json()["generations"]
    assert keyed or len(listed) > 5, listed  # fuzzed generations were accepted
    assert not failures, "\n\n".join(failures[:10]) + f"\n\n({len(failures)} failures)"
    statuses = collections.Counter(seen)
    assert sum(statuses.values()) > 300 and {200, 201, 404, 422} <= set(statuses), statuses
    assert keyed or 202 in statuses, statuses


# ---------------------------------------------------------------------------------------------- a generated client
def test_a_generated_client_enrolls_generates_and_downloads(keyed_server, faces_dir, tmp_path):
    """openapi-python-client makes a package from the live /openapi.json (with image/png read as a file, its
    documented option), imported as generated: it enrolls a photo, submits, polls and downloads the PNG."""
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if generator is None:
        pytest.fail("this test needs openapi-python-client: pip install -e '.[test]' (it pins it)")
    (tmp_path / "openapi.json").write_bytes(requests.get(f"{keyed_server}/openapi.json", timeout=DEADLINE).content)
    (tmp_path / "config.yml").write_text(
        "content_type_overrides:\n  image/png: application/octet-stream\npost_hooks: []\n"
    )
    generated = subprocess.run(
        [generator, "generate", "--path", "openapi.json", "--config", "config.yml", "--meta", "none", "--output-path"]
        + ["faceid_schema_client"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0 and "Warning" not in generated.stdout + generated.stderr, generated
    sys.path.insert(0, str(tmp_path))
    try:
        client_package = importlib.import_module("faceid_schema_client")
        from faceid_schema_client.api.generations import create_generation, get_generation, get_image
        from faceid_schema_client.api.identities import create_identity
        from faceid_schema_client.models import BodyCreateIdentity, GenerationRequest
        from faceid_schema_client.types import File
    finally:
        sys.path.remove(str(tmp_path))

    client = client_package.AuthenticatedClient(base_url=keyed_server, token=KEY)
    photo = File(
        payload=io.BytesIO((faces_dir / "obama.jpg").read_bytes()), file_name="obama.jpg", mime_type="image/jpeg"
    )
    identity = create_identity.sync(client=client, body=BodyCreateIdentity(photos=[photo], name="Obama"))
    assert identity.name == "Obama" and len(identity.faces) == 1, identity
    request = GenerationRequest(prompt="a photo of a person", identity_id=identity.id, seed=7, **TINY)
    accepted = create_generation.sync(client=client, body=request)
    assert accepted.status == "queued", accepted
    deadline = time.monotonic() + DEADLINE
    while (job := get_generation.sync(job_id=accepted.id, client=client)).status not in ("done", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job.status == "done" and job.settings.seed == [7], job
    image_id = job.images[0].split("/")[-1].removesuffix(".png")
    downloaded = get_image.sync(image_id=image_id, client=client)
    image = Image.open(downloaded.payload)
    assert image.format == "PNG" and image.size == (TINY["width"], TINY["height"])
    # An error is the declared ErrorBody, parsed by the generated model.
    missing = get_generation.sync(job_id="nope", client=client)
    assert missing.error.code == "not_found", missing

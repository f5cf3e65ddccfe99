"""``faceid serve --ray`` with parity: on a local Ray instance (started once for the module), 2 CPU model replicas
running the single server's worker and 2 ingress replicas, all sharing the job state through the database, on SQLite
and on PostgreSQL. The service suite's main cases run through the HTTP proxy (modes, several people, style, events
with progress and previews, key isolation, deletion), and a second ingress process outside Ray (the same app on the
same database and data dir) reads and cancels a job a replica runs: a restarted ingress loses nothing."""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import local_ray  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_modes import make_controlnet  # noqa: E402
from tiny_models import FEW_STEP_LAYOUTS, few_step_lora_state, make_tiny_autoencoder  # noqa: E402

from faceid.cli import build_parser  # noqa: E402
from faceid.cli.serve import ray_options, serve_parts  # noqa: E402
from faceid.outputs import SETTINGS_KEY  # noqa: E402
from faceid.service.app import create_app  # noqa: E402
from faceid.service.ray_serve import (  # noqa: E402
    APP_NAME,
    INGRESS_DEPLOYMENT,
    MODEL_DEPLOYMENT,
    ReplicaDescription,
    _service_config,
    build_application,
)

TINY = {"num_inference_steps": 2, "width": 24, "height": 16}
DEADLINE = 150.0  # any one wait: replicas loading on 2 busy cores, a job behind others
KEY_A, KEY_B = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (2 CPUs: one per model replica; small object store, no dashboard,
    loopback), with Serve's HTTP proxy on a free port; shut down even on failure."""
    with local_ray():
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield port
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def controlnet_dir(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    make_controlnet(tiny_models.sd15, seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_files(tiny_models, tmp_path_factory):
    """What the server loads beside the model set: a local few-step LoRA (``--fast lcm=FILE``) and a tiny VAE."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("served")
    unet = UNet2DConditionModel.from_pretrained(tiny_models.sd15, subfolder="unet")
    save_file(few_step_lora_state(unet, FEW_STEP_LAYOUTS["lcm"]), str(folder / "lcm.safetensors"))
    return {"lcm": folder / "lcm.safetensors", "tiny_vae": make_tiny_autoencoder(folder / "tiny-vae")}


class Cluster:
    """The application on Ray (``http``: a client of Serve's proxy, key A), what it was built from, and a second
    ingress outside Ray on the same database and data dir (``other``, a TestClient)."""

    def __init__(self, http, other, data_dir, options) -> None:
        self.http, self.other, self.data_dir, self.options = http, other, data_dir, options


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request, ray_local, tmp_path_factory, tiny_models, face_models_dir, controlnet_dir, served_files):
    """``faceid serve --ray`` as its command line builds it, deployed with 2 model and 2 ingress replicas."""
    start = time.monotonic()
    data = tmp_path_factory.mktemp(f"data-{request.param}")
    database = ["--database-url", request.getfixturevalue("postgres_server").new_database()] if (
        request.param == "postgres") else []  # fmt: skip
    argv = ["serve", "--ray", "--base-model", str(tiny_models.sd15), "--adapter",
            str(tiny_models.adapter("faceid", "safetensors")), "--replicas", "2", "--ingress-replicas", "2",
            "--max-batch", "4", "--data-dir", str(data), "--face-models", str(face_models_dir), "--max-steps", "400",
            "--controlnet", f"canny={controlnet_dir}", "--style-adapter", f"tiny={tiny_models.reference('plain')}",
            "--reference-encoder", str(tiny_models.image_encoder), "--preview-every", "1",
            "--fast", f"lcm={served_files['lcm']}", "--tiny-vae", str(served_files["tiny_vae"]),
            "--api-key", "key-a", "--api-key", "key-b", "--port", str(ray_local), *database]  # fmt: skip
    args = build_parser().parse_args(argv)
    loader, fields = serve_parts(args)
    options = ray_options(args, fields, gpus=0)
    assert (options.replicas, options.ingress_replicas, options.gpus) == (2, 2, False)
    serve.run(build_application(loader, options), name=APP_NAME, route_prefix="/")
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME)
    # The same app outside Ray: another ingress process would be this (it claims no job)
    config = _service_config(options, loader, worker_factory=lambda s: [ReplicaDescription(s, handle, 2)])
    other = TestClient(create_app(config), base_url=f"http://127.0.0.1:{ray_local}", headers=KEY_A)
    other.__enter__()
    http = httpx.Client(base_url=f"http://127.0.0.1:{ray_local}", timeout=60, headers=KEY_A)
    try:
        while (health := http.get("/health")).status_code != 200 or health.json()["status"] != "ok":
            assert time.monotonic() - start < DEADLINE, health.text
            time.sleep(0.2)
        yield Cluster(http, other, data, options)
    finally:
        http.close()
        other.__exit__(None, None, None)
        serve.delete(APP_NAME)


def enroll(client, faces_dir, name: str, headers=None) -> str:
    photo = (faces_dir / name).read_bytes()
    response = client.post("/v1/identities", files=[("photos", (name, photo, "image/jpeg"))], headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def upload(client, data: bytes, name: str = "image.png") -> str:
    response = client.post("/v1/uploads", files={"image": (name, data, "image/png")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit(client, headers=None, **body) -> str:
    response = client.post("/v1/generations", json={"prompt": "a photo of a person", **TINY, **body}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def finished(client, job_id: str) -> dict:
    deadline = time.monotonic() + DEADLINE
    while (view := client.get(f"/v1/generations/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    return view


def png(client, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def picture(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def event_stream(client, job_id: str):
    kind = None
    with client.stream("GET", f"/v1/generations/{job_id}/events") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


def test_every_mode_people_and_style_run_on_the_replicas(cluster, faces_dir):
    http = cluster.http
    models = http.get("/v1/models").json()
    assert models["modes"][:3] == ["text-to-image", "img2img", "inpaint"] and "swap" in models["modes"]
    assert set(models["controlnets"]) == {"canny"} and set(models["style_adapters"]) == {"tiny"}
    assert set(models["fast"]) == {"lcm"} and models["decoders"] == ["full", "tiny"]
    assert models["max_people"] > 1 and models["workers"][0]["device"] == "ray (2 cpu replicas)", models["workers"]
    obama, biden = enroll(http, faces_dir, "obama.jpg"), enroll(http, faces_dir, "biden.jpg")
    init, mask = upload(http, picture(24, 16)), upload(http, picture(24, 16, seed=1))
    photo = upload(http, (faces_dir / "obama2.jpg").read_bytes(), "obama2.jpg")
    requests = {
        "text": {"identity_id": obama, "seed": 1},
        "text, batched": {"identity_id": biden, "seed": 2},
        "img2img": {"identity_id": obama, "init_image": init, "seed": 3},
        "inpaint": {"identity_id": obama, "init_image": init, "mask_image": mask, "seed": 4},
        "controlnet": {"identity_id": obama, "controls": [{"kind": "canny", "image": init}], "seed": 5},
        "people": {"people": [obama, biden], "seed": 6},
        "style": {"identity_id": obama, "style": [{"image": photo, "adapter": "tiny", "scale": 0.8}], "seed": 7},
        "few-step preset": {"identity_id": obama, "fast": "lcm", "num_inference_steps": None, "seed": 9},
        "tiny decoder": {"identity_id": biden, "decoder": "tiny", "seed": 10},
        "swap": {
            "identity_id": biden,
            "swap": {"target": photo, "resolution": 64},
            "seed": 8,
            "width": None,
            "height": None,
        },  # fmt: skip
    }
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = dict(zip(requests, pool.map(lambda body: submit(http, **body), requests.values()), strict=True))
    replicas = set()
    for name, job in jobs.items():
        view = finished(http, job)
        assert view["status"] == "done" and len(view["images"]) == 1, (name, view)
        image = png(http, view["images"][0])
        meta = json.loads(image.text[SETTINGS_KEY])
        assert meta["generation_id"] == job and meta["seed"] == requests[name]["seed"], (name, meta)
        replicas.add(meta["replica"])
        if name == "swap":
            assert image.size == Image.open(faces_dir / "obama2.jpg").size and view["mode"] == "swap"
        else:
            assert image.size == (24, 16), name
    assert finished(http, jobs["controlnet"])["mode"].startswith("controlnet")
    assert png(http, finished(http, jobs["controlnet"])["control_images"][0]).size == (24, 16)
    assert finished(http, jobs["people"])["settings"]["regions"] == "auto"
    assert finished(http, jobs["style"])["settings"]["style"] == [{"adapter": "tiny", "scale": 0.8}]
    fast = finished(http, jobs["few-step preset"])["settings"]
    assert (fast["fast"], fast["num_inference_steps"], fast["scheduler"]) == ("lcm", 4, "lcm")
    assert finished(http, jobs["tiny decoder"])["settings"]["decoder"] == "tiny"
    assert len(replicas) == 2, replicas  # both model replicas made images
    # each job ran once (claimed by one replica): no image file beyond those listed
    made = [p.name for p in (cluster.data_dir / "images").iterdir() if "-control" not in p.name]
    assert len(made) == len(jobs), made


def test_progress_previews_and_cancel_through_another_ingress(cluster, faces_dir):
    http, other = cluster.http, cluster.other
    identity = enroll(http, faces_dir, "obama.jpg")
    job = submit(http, identity_id=identity, num_inference_steps=400, seed=9)  # long enough to cancel mid-run
    seen = []
    for kind, data in event_stream(other, job):  # the other ingress streams what a replica writes
        seen.append((kind, data))
        if kind == "preview":
            assert data["images"][0].startswith("data:image/jpeg;base64,") and data["image_index"] == [0]
        if sum(k == "progress" for k, _ in seen) >= 3 and any(k == "preview" for k, _ in seen):
            break
    assert seen[0][0] == "queued" and [d["step"] for k, d in seen if k == "progress"][:3] == [1, 2, 3]
    running = other.get(f"/v1/generations/{job}").json()
    assert running["status"] == "running" and running["progress"]["step"] >= 3
    assert other.delete(f"/v1/generations/{job}").json()["status"] == "running"  # stops at its next step
    view = finished(http, job)  # read through the Ray ingress
    assert view["status"] == "cancelled" and view["progress"]["step"] < 400 and view["images"] == []
    kinds = [kind for kind, _ in event_stream(http, job)]
    assert kinds[0] == "queued" and kinds[-1] == "cancelled" and "progress" in kinds
    assert not list((cluster.data_dir / "previews").glob(f"{job}-*"))  # the preview file went with the job


def test_keys_isolation_deletion_and_a_restarted_ingress(cluster, faces_dir):
    http, other = cluster.http, cluster.other
    identity = enroll(http, faces_dir, "obama.jpg")
    job = submit(http, identity_id=identity, seed=11, num_images_per_prompt=2)
    # every ingress replica is stopped and started again by Serve: the jobs are in the database
    ingresses = [a for a in ray.util.list_named_actors(all_namespaces=True) if INGRESS_DEPLOYMENT in a["name"]]
    assert len(ingresses) == 2, ingresses
    for actor in ingresses:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    view = finished(http, job)
    assert view["status"] == "done" and len(view["images"]) == 2
    assert other.get(f"/v1/generations/{job}").json() == view  # any process answers the same
    # another key sees nothing of it
    for path in (f"/v1/generations/{job}", view["images"][0], f"/v1/identities/{identity}"):
        assert http.get(path, headers=KEY_B).status_code == 404, path
    assert http.get("/v1/generations", headers=KEY_B).json()["generations"] == []
    # deletion: its images' files and rows
    assert http.delete(f"/v1/generations/{job}", params={"purge": "true"}).status_code == 204
    assert http.get(f"/v1/generations/{job}").status_code == 404
    assert http.get(view["images"][0]).status_code == 404
    names = [url.split("/")[-1] for url in view["images"]]
    assert not [p for p in (cluster.data_dir / "images").iterdir() if p.name in names]

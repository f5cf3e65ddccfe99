"""``faceid serve`` with several model sets: a catalog (the tiny SD1.5 FaceID set, the default, and the tiny
SDXL one), picked per request by its model fields, loaded by each worker within a memory budget."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_serve import Recording, enroll, error, generate, make_client, png, wait_finished  # noqa: F401 (a fixture)

from faceid.methods import METHODS
from faceid.pipeline import FaceIDPipeline
from faceid.service.jobs import PASS_OVER_LIMIT, JobQueue, QueuedJob
from faceid.service.models import GB, pipeline_bytes
from faceid.service.store import Job, Store
from faceid.settings import GenerationSettings


@pytest.fixture
def sets(tiny_models, analyzer):
    """The two model sets' fields and a loader that records what it loads (each pipeline wrapped in a
    ``Recording``)."""
    sd15 = {"base_model": str(tiny_models.sd15), "adapter": str(tiny_models.adapter("faceid"))}
    sdxl = {"base_model": str(tiny_models.sdxl), "adapter": str(tiny_models.adapter("faceid-sdxl"))}
    loads: list[GenerationSettings] = []
    made: list[Recording] = []

    def loader(device, models):
        loads.append(models)
        loaded = FaceIDPipeline.from_pretrained(
            models.base_model, models.adapter, device="cpu", progress=False, face_analyzer=analyzer
        )
        made.append(Recording(loaded))
        return made[-1]

    class Sets:
        pass

    found = Sets()
    found.sd15, found.sdxl, found.loader, found.loads, found.made = sd15, sdxl, loader, loads, made
    found.catalog = (sd15, sdxl)
    return found


def models_of(client) -> dict:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return response.json()


def image_settings(client, url) -> dict:
    return json.loads(png(client.get(url)).text["faceid"])


def test_each_request_runs_on_the_model_set_it_names(make_client, faces_dir, sets, pipe, analyzer):  # noqa: F811
    client = make_client(pipeline=Recording(pipe), loader=sets.loader, catalog=sets.catalog, start_workers=False)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    listed = models_of(client)
    assert [(e["index"], e["family"], e["adapter"]) for e in listed["catalog"]] == [
        (0, "SD1.5", sets.sd15["adapter"]), (1, "SDXL", sets.sdxl["adapter"])
    ]  # fmt: skip
    assert listed["catalog"][1]["defaults"]["width"] == 1024 and listed["catalog"][1]["loaded_on"] == []
    assert listed["workers"][0]["loaded_models"] == [0] and listed["defaults"]["width"] == 512  # the old keys stay

    # Settings are resolved at submit with the chosen set's family, before it is loaded.
    default = generate(client, identity, width=None, height=None).json()["id"]
    by_base = generate(client, identity, base_model=sets.sdxl["base_model"], width=None, height=None).json()["id"]
    queued = {job: client.get(f"/v1/generations/{job}").json()["settings"] for job in (default, by_base)}
    assert (queued[default]["width"], queued[default]["height"], queued[default]["guidance_scale"]) == (512, 768, 7.5)
    assert (queued[by_base]["width"], queued[by_base]["height"], queued[by_base]["guidance_scale"]) == (1024, 1024, 5.0)
    assert queued[by_base]["adapter"] == sets.sdxl["adapter"]  # unnamed fields: the set's
    for job in (default, by_base):  # too slow at full size on a CPU: not run
        assert client.delete(f"/v1/generations/{job}").json()["status"] == "cancelled"
    assert sets.loads == []  # nothing was loaded for queued jobs

    client.app.state.service.queue.set_paused(False)
    sd15_job = generate(client, identity, seed=3).json()["id"]
    sdxl_job = generate(client, identity, adapter=sets.sdxl["adapter"], seed=4).json()["id"]
    views = {job: wait_finished(client, job) for job in (sd15_job, sdxl_job)}
    assert [v["status"] for v in views.values()] == ["done", "done"], views
    assert [m.base_model for m in sets.loads] == [sets.sdxl["base_model"]]  # SDXL loaded once, for its job

    for job, models, family in ((sd15_job, sets.sd15, "SD1.5"), (sdxl_job, sets.sdxl, "SDXL")):
        stored = image_settings(client, views[job]["images"][0])
        # The set's local model folder and file, by name (and sha256): a served image holds no server path.
        adapter = Path(models["adapter"])
        assert stored["model_files"] == {
            "base_model": {"name": Path(models["base_model"]).name},
            "adapter": {"name": adapter.name, "sha256": hashlib.sha256(adapter.read_bytes()).hexdigest()},
        }
        assert stored["guidance_scale"] == {"SD1.5": 7.5, "SDXL": 5.0}[family]
        # The job's settings are complete (the SDXL set's adapter defaults filled in by the worker that loaded
        # it): the pipeline that made the image would resolve nothing more, and the PNG holds the same.
        settings = GenerationSettings.parse(views[job]["settings"])
        assert {"scale", "lora_scale", "combine"} <= set(views[job]["settings"])
        made = pipe if family == "SD1.5" else sets.made[0]
        assert made.resolve_settings(settings) == settings
        alone = {k: v for k, v in settings.for_image(0).to_json().items() if k not in ("base_model", "adapter")}
        assert stored == {**alone, "model_files": stored["model_files"], "identity_id": identity,
                          "generation_id": job, "mode": "text-to-image", "faceid_version": stored["faceid_version"],
                          "licences": METHODS["faceid"].licence_record()["licences"], "commercial_use": False}  # fmt: skip
    # The SDXL image is the one its pipeline makes from the PNG's settings, as `faceid generate --settings` does.
    path = client.app.state.service.data.image(views[sdxl_job]["images"][0].split("/")[-1].removesuffix(".png"))
    again = sets.made[0].wrapped(face=analyzer.get(faces_dir / "obama.jpg"), settings=GenerationSettings.from_png(path))
    served = np.asarray(png(client.get(views[sdxl_job]["images"][0])), dtype=int)
    assert np.abs(np.asarray(again.images[0], dtype=int) - served).max() <= 1


def test_a_budget_for_one_model_set_evicts_the_least_recently_used(
    make_client,  # noqa: F811
    faces_dir,
    sets,
    pipe,
    caplog,
    tmp_path,
):
    sd15_bytes = pipeline_bytes(pipe)
    client = make_client(loader=sets.loader, catalog=sets.catalog, model_memory_gb=sd15_bytes * 1.8 / GB)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]

    def run(**models) -> None:
        assert wait_finished(client, generate(client, identity, **models).json()["id"])["status"] == "done"

    run(**sets.sdxl)
    listed = models_of(client)
    worker = listed["workers"][0]
    assert worker["loaded_models"] == [1] and worker["family"] == "SDXL"  # the SD1.5 set was evicted
    assert worker["memory"]["used_bytes"] == pipeline_bytes(sets.made[0]) <= worker["memory"]["budget_bytes"]
    assert [e["loaded_on"] for e in listed["catalog"]] == [[], [worker["device"]]]
    run(adapter=sets.sd15["adapter"])  # loaded again, evicting the SDXL set
    assert models_of(client)["workers"][0]["loaded_models"] == [0]
    assert [m.adapter for m in sets.loads] == [sets.sdxl["adapter"], sets.sd15["adapter"]]
    run()  # loaded: nothing more loads
    assert len(sets.loads) == 2

    # A budget for both keeps both, least recently used first.
    roomy = make_client(loader=sets.loader, catalog=sets.catalog, data_dir=tmp_path / "roomy")
    assert roomy.app.state.service.workers[0].models.budget > 10 * sd15_bytes  # the default: a share of the RAM
    other = enroll(roomy, faces_dir, "obama.jpg").json()["id"]
    assert wait_finished(roomy, generate(roomy, other, **sets.sdxl).json()["id"])["status"] == "done"
    assert wait_finished(roomy, generate(roomy, other).json()["id"])["status"] == "done"
    assert models_of(roomy)["workers"][0]["loaded_models"] == [1, 0]

    # A set larger than the whole budget still runs, alone, and says so.
    tight = make_client(loader=sets.loader, catalog=sets.catalog, model_memory_gb=1 / GB,
                        data_dir=tmp_path / "tight")  # fmt: skip
    third = enroll(tight, faces_dir, "obama.jpg").json()["id"]
    with caplog.at_level(logging.WARNING, logger="faceid.service.models"):
        assert wait_finished(tight, generate(tight, third, **sets.sdxl).json()["id"])["status"] == "done"
    assert models_of(tight)["workers"][0]["loaded_models"] == [1]
    assert "more than the whole model memory budget" in caplog.text


def test_models_outside_the_catalog_are_refused_without_touching_them(
    make_client,  # noqa: F811
    faces_dir,
    sets,
    tiny_models,
    monkeypatch,
    tmp_path,
):
    link = tmp_path / "sdxl-link"  # the SDXL set as configured; a request may name it by its resolved path too
    link.symlink_to(sets.sdxl["base_model"], target_is_directory=True)
    client = make_client(loader=sets.loader, catalog=(sets.sd15, {**sets.sdxl, "base_model": str(link)}))
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    elsewhere = str(tiny_models.adapter("faceid-portrait"))  # a real adapter file, but not served here
    stat = os.stat
    touched = []
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: touched.append(str(path)) or stat(path, *a, **k))
    for models in ({"adapter": elsewhere}, {"base_model": "../../../etc"}, {"vae": "stabilityai/sd-vae-ft-mse"},
                   {"base_model": sets.sdxl["base_model"], "adapter": sets.sd15["adapter"]},  # each set has one
                   {"loras": {elsewhere: 1.0}}):  # fmt: skip
        message = error(generate(client, identity, **models), 422, "invalid_request", "does not serve")
        assert sets.sd15["adapter"] in message and str(link) in message and "SDXL" in message
    monkeypatch.undo()
    assert not [path for path in touched if "../etc" in path or "portrait" in path]
    assert sets.loads == [] and client.app.state.service.store.unfinished_jobs() == []
    view = wait_finished(client, generate(client, identity, base_model=os.path.realpath(link)).json()["id"])
    assert view["status"] == "done" and view["settings"]["base_model"] == str(link)  # the set's own name
    assert [m.base_model for m in sets.loads] == [str(link)]


def test_batches_never_mix_model_sets(make_client, faces_dir, sets, pipe):  # noqa: F811
    default = Recording(pipe)
    client = make_client(pipeline=default, loader=sets.loader, catalog=sets.catalog, start_workers=False, max_batch=4)
    identity = enroll(client, faces_dir, "obama.jpg").json()["id"]
    jobs = [
        generate(client, identity, prompt=f"photo {i}", seed=i, **(sets.sdxl if i % 2 else {})).json()["id"]
        for i in range(4)
    ]
    client.app.state.service.queue.set_paused(False)
    views = [wait_finished(client, job) for job in jobs]
    assert all(v["status"] == "done" for v in views)
    (sdxl,) = sets.made
    assert [c.prompt for c in default.calls] == [["photo 0", "photo 2"]]  # one call per set, each its own jobs
    assert [c.prompt for c in sdxl.calls] == [["photo 1", "photo 3"]]
    for i, view in enumerate(views):
        adapter = Path((sets.sdxl if i % 2 else sets.sd15)["adapter"]).name
        assert image_settings(client, view["images"][0])["model_files"]["adapter"]["name"] == adapter


def test_jobs_for_loaded_models_go_first_but_the_oldest_is_passed_over_a_bounded_number_of_times(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'queue.db'}")
    queue = JobQueue(store, max_queue=16)
    jobs = {}

    def put(job_id: str, settings: GenerationSettings, entry: str, created: int) -> None:
        job = QueuedJob(job_id, "", settings, [""], created, entry=entry)
        jobs[job_id] = job
        queue.put(Job(id=job_id, owner="", status="queued", created_ns=created, identity_ids=[""],
                      settings=settings.to_json(), batch_key=job.batch_key))  # fmt: skip

    put("cold", GenerationSettings(prompt="p", seed=[0], base_model="b"), "b", 0)
    for i in range(PASS_OVER_LIMIT + 2):  # each its own batch (another step count)
        put(f"warm{i}", GenerationSettings(prompt="p", seed=[0], num_inference_steps=i + 1), "a", i + 1)

    def make(row):  # the passes over a row are counted in the database
        return replace(jobs[row.id], passed_over=row.passed_over or 0)

    order = [
        job.id
        for _ in range(PASS_OVER_LIMIT + 3)
        for job in queue.take("w", 4, make, timeout=0, ready=lambda job: job.entry == "a")
    ]
    assert order == [f"warm{i}" for i in range(PASS_OVER_LIMIT)] + ["cold", f"warm{PASS_OVER_LIMIT}",
                                                                   f"warm{PASS_OVER_LIMIT + 1}"]  # fmt: skip
    assert queue.take("w", 4, make, timeout=0) == [] and queue.running == len(order)
    store.close()


def test_serve_flags_for_several_model_sets(tmp_path, capsys):
    from faceid.cli import main
    from faceid.cli.serve import _model_set

    assert _model_set("base,faceid-sdxl") == {"base_model": "base", "adapter": "faceid-sdxl"}
    assert _model_set(",faceid-sdxl") == {"adapter": "faceid-sdxl"}  # the adapter's released base model
    data = str(tmp_path / "d")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--data-dir", data, "--also-model", "a,b,c,d"])
    assert exited.value.code == 2
    assert "BASE_MODEL[,ADAPTER[,VAE]]" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

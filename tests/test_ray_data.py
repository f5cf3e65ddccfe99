"""``faceid prepare --ray`` and ``faceid eval --ray`` on a local Ray instance with 2 workers: the same dataset
(shards, manifest, dataset.json byte for byte) and the same evaluation (images, rows, summary, plots; scores
within float noise) as without ``--ray``, and both resume as the single-process commands do."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")  # Ray Data needs pandas and pyarrow (faceid[cluster])

from conftest import local_ray  # noqa: E402
from test_data import dataset_bytes, make_image_folder  # noqa: E402

from faceid.cli.evaluate import add_eval_arguments, cmd_eval  # noqa: E402
from faceid.cli.prepare import add_prepare_arguments, cmd_prepare  # noqa: E402
from faceid.data import prepare_dataset  # noqa: E402
from faceid.errors import FaceIDError  # noqa: E402
from faceid.faces import FaceAnalyzer  # noqa: E402
from faceid.outputs import read_settings  # noqa: E402
from faceid.ray_data import RayWorkers, map_on_actors  # noqa: E402

DEADLINE_S = 240  # each test, Ray's start included (about 40 s on 2 idle cores)


@pytest.fixture(scope="module")
def ray_local():
    """This module's own local Ray instance (2 CPUs, a small object store, no dashboard, loopback), shut down at
    the end even on failure; a test that runs past DEADLINE_S fails instead of hanging."""
    with local_ray():
        yield


@pytest.fixture
def deadline():
    def expired(signum, frame):
        raise TimeoutError(f"the test ran past {DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(DEADLINE_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _pid_and_items(state, items):
    return [(state, item, np.full(2, item, np.float32)) for item in items]


def _broken(state, items):
    raise FaceIDError("the models are broken: load others")


def test_map_on_actors_runs_every_item_on_the_pool(ray_local, deadline):
    """Every item once, its result back by its index (any order), from actors that loaded their state once."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    items = list(range(9))
    results = dict(map_on_actors(items, os.getpid, _pid_and_items, RayWorkers(workers=2, batch_size=2)))
    assert sorted(results) == items
    for index, (pid, item, array) in results.items():
        assert item == index and array.dtype == np.float32 and array.tolist() == [index, index]
        assert pid != os.getpid()  # made on an actor, not here
    assert list(map_on_actors([], os.getpid, _pid_and_items, RayWorkers())) == []
    with pytest.raises(FaceIDError) as raised:  # as itself, not wrapped in Ray's error
        list(map_on_actors(items, os.getpid, _broken, RayWorkers(workers=1)))
    assert type(raised.value) is FaceIDError and str(raised.value) == "the models are broken: load others"
    with pytest.raises(ValueError, match="workers"):
        RayWorkers(workers=0)


def test_prepare_on_ray_writes_the_same_dataset(ray_local, deadline, tmp_path, faces_dir, face_models_dir):
    images = make_image_folder(tmp_path / "images", faces_dir)
    factory = functools.partial(FaceAnalyzer.from_dir, face_models_dir)
    common = {"with_crops": True, "shard_size": 4, "progress": False}
    alone = prepare_dataset(images, tmp_path / "alone", factory, workers=1, **common)
    on_ray = prepare_dataset(images, tmp_path / "ray", factory, ray=RayWorkers(workers=2, batch_size=3), **common)
    assert (on_ray.images, on_ray.kept, on_ray.skipped, on_ray.shards) == (
        alone.images,
        alone.kept,
        alone.skipped,
        alone.shards,
    )
    assert alone.shards >= 4 and alone.kept >= 8 and alone.total_skipped >= 5
    expected = dataset_bytes(tmp_path / "alone")
    assert dataset_bytes(tmp_path / "ray") == expected  # shards (arrays and rows), manifest, skips, dataset.json

    # Resumable as without Ray, from the command line: a lost shard is made again, the others are kept.
    lost = tmp_path / "ray" / "shards" / "shard-00001.safetensors"
    lost.unlink()
    parser = add_prepare_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [str(images), "--out", str(tmp_path / "ray"), "--face-models", str(face_models_dir), "--with-crops"]
        + ["--shard-size", "4", "--ray", "--workers", "2"]
    )
    assert args.ray == "" and args.workers == 2
    args.quiet = True
    assert cmd_prepare(args) == 0
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert (report["reused_shards"], report["shards"]) == (alone.shards - 1, alone.shards)
    assert dataset_bytes(tmp_path / "ray") == expected
    assert parser.parse_args([str(images), "--out", "o", "--ray", "auto"]).ray == "auto"
    assert parser.parse_args([str(images), "--out", "o"]).ray is None


def _close(actual, expected, path="") -> None:
    """Equal JSON values, floats within float noise (CLIP's embeddings of other batches)."""
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        assert actual == pytest.approx(expected, abs=1e-5), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key in expected:
            _close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _close(a, e, f"{path}[{k}]")
    else:
        assert actual == expected, path


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_eval_on_ray_gives_the_same_images_and_scores(
    ray_local, deadline, tmp_path, capsys, tiny_models, face_models_dir, two_people, tiny_clip_dir
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an oil painting of a person\n")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)

    def run(out: Path, *extra: str) -> str:
        args = parser.parse_args(
            ["--faces", str(two_people), "--group", "obama,biden", "--prompts", str(prompts), "--seeds", "2"]
            + ["--scales", "0.5,1", "--out", str(out), "--batch-size", "2", "--base-model", str(tiny_models.sd15)]
            + ["--adapter", str(tiny_models.adapter("faceid", "safetensors")), "--face-models", str(face_models_dir)]
            + ["--clip", str(tiny_clip_dir), "--clip-device", "cpu", "--device", "cpu"]
            + ["--steps", "2", "--width", "24", "--height", "16", *extra]
        )
        assert cmd_eval(args) == 0
        return capsys.readouterr().out

    alone, on_ray = tmp_path / "alone", tmp_path / "ray"
    # One thread, as each 1-CPU actor computes: on a CPU the thread count changes the order of float sums (a
    # pixel may move by 1/255), not the seeds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(alone)
    finally:
        torch.set_num_threads(threads)
    printed = run(on_ray, "--ray", "--workers", "2")
    assert "12 image(s) generated, 0 reused" in printed  # (2 identities + 1 group) x 1 prompt x 2 seeds x 2 scales

    # The same files: every image the same pixels and the same stored settings, the same plots.
    assert _files(on_ray) == _files(alone)
    pngs = sorted(p for p in _files(alone) if p.startswith("images/"))
    assert len(pngs) == 12
    for name in pngs:
        with Image.open(alone / name) as a, Image.open(on_ray / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        assert read_settings(on_ray / name) == read_settings(alone / name)
    # The same scores: every row (identity per recognizer, each person of the group, CLIP-T, diversity).
    rows = [json.loads(line) for line in (alone / "results.jsonl").read_text().splitlines()]
    ray_rows = [json.loads(line) for line in (on_ray / "results.jsonl").read_text().splitlines()]
    _close(ray_rows, rows)
    assert any("people" in row for row in rows) and all(row["clip_t"] is not None for row in rows)
    assert {name for row in rows for name in row["similarity"]} == {"standin_recognizer", "sface"}
    summary, ray_summary = (json.loads((folder / "summary.json").read_text()) for folder in (alone, on_ray))
    assert ray_summary["timing"]["images"] == summary["timing"]["images"] == 12
    summary.pop("timing"), ray_summary.pop("timing")  # seconds differ
    _close(ray_summary, summary)

    # Resumed on Ray as without it: nothing made again, the same rows.
    printed = run(on_ray, "--ray", "--workers", "1")
    assert "0 image(s) generated, 12 reused" in printed
    _close([json.loads(line) for line in (on_ray / "results.jsonl").read_text().splitlines()], rows)


def test_eval_on_ray_compares_methods_as_without_ray(
    ray_local, deadline, tmp_path, capsys, tiny_models, both_packs, instantid_dir, faces_dir
):
    """--method faceid,instantid on Ray: both methods' calls on one pool of actors (the tiny SDXL with InstantID
    loaded on each), the training recognizer InstantID adds (glintr100) loaded by the scoring actors too; the same
    folders, images and rows as without Ray."""
    from faceid.cli.main import main

    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copyfile(faces_dir / "obama.jpg", faces / "obama.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a person\n")

    def run(out: Path, *extra: str) -> None:
        argv = ["eval", "--faces", str(faces), "--prompts", str(prompts), "--seeds", "1", "--scales", "0.6",
                "--method", "faceid,instantid", "--method-weights", f"instantid={instantid_dir}", "--out", str(out),
                "--base-model", str(tiny_models.sdxl), "--adapter", str(tiny_models.adapter("faceid-sdxl")),
                "--face-models", str(both_packs), "--recognizers", "arcface", "--no-clip", "--no-plots",
                "--device", "cpu", "--steps", "1", "--width", "48", "--height", "32", *extra]  # fmt: skip
        assert main(argv) == 0

    alone, on_ray = tmp_path / "alone", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU actor computes
    try:
        run(alone)
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    run(on_ray, "--ray", "--workers", "1")
    printed = capsys.readouterr().out
    for method in ("faceid", "instantid"):
        assert f"1 image(s) generated, 0 reused from {on_ray / method}" in printed
    assert _files(on_ray) == _files(alone)
    pngs = sorted(p for p in _files(alone) if p.endswith(".png"))
    assert [p.split("/")[0] for p in pngs] == ["faceid", "instantid"]
    for name in pngs:
        with Image.open(alone / name) as a, Image.open(on_ray / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    for rows_file in ("results.jsonl", "faceid/results.jsonl", "instantid/results.jsonl"):
        rows = [json.loads(line) for line in (alone / rows_file).read_text().splitlines()]
        _close([json.loads(line) for line in (on_ray / rows_file).read_text().splitlines()], rows)
    rows = [json.loads(line) for line in (alone / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["faceid", "instantid"]
    assert all(list(r["similarity"]) == ["arcface", "glintr100"] for r in rows)  # glintr100: added for InstantID
    summary, ray_summary = (json.loads((folder / "summary.json").read_text()) for folder in (alone, on_ray))
    for table in (summary, ray_summary):
        for method in table["methods"]:
            method.pop("timing"), method.pop("seconds_per_image")
    _close(ray_summary, summary)

"""The evaluation end to end and offline: tiny SD1.5 + FaceID adapter, YuNet + stand-in recognizer, SFace, tiny CLIP."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from faceid.cli.evaluate import add_eval_arguments, cmd_eval
from faceid.cli.score import add_score_arguments, cmd_score
from faceid.errors import FaceIDError
from faceid.evaluation import (
    best_of,
    default_prompts_path,
    load_prompts,
    parse_scales,
    parse_seeds,
    run_eval,
    score_folder,
)
from faceid.outputs import read_settings, save_png
from faceid.scoring import ClipTextScorer, IdentityScore, IdentityScorer, diversity, sface_scorer

TINY = {"settings": {"num_inference_steps": 2, "width": 24, "height": 16}}
PROMPTS = ["a photo of a person in a garden", "an oil painting of a person"]


class CountingPipe:
    """The real pipeline, counting the images it is asked to generate."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.images = 0

    def __call__(self, *args, **kwargs):
        self.images += kwargs["settings"].num_images_per_prompt
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


# ---------------------------------------------------------------------- run_eval
def test_run_eval_end_to_end_then_resumes(tmp_path, pipe, analyzer, two_people, tiny_clip_dir):
    out = tmp_path / "eval"
    scorers = [IdentityScorer(analyzer), sface_scorer()]
    clip = ClipTextScorer(tiny_clip_dir, device="cpu")
    counting = CountingPipe(pipe)
    messages = []

    def run(scales=(0.5, 1.0), **extra):
        options = {"batch_size": 2, "log": messages.append, **TINY, **extra}
        return run_eval(counting, two_people, PROMPTS, 2, scales, out, scorers, clip, **options)

    result = run()
    assert (result.generated, result.reused, counting.images) == (16, 0, 16)

    # results.jsonl: one row per image of the grid 2 identities x 2 prompts x 2 seeds x 2 scales.
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows == result.rows
    grid = {(r["identity"], r["prompt"], r["seed"], r["scale"]) for r in rows}
    assert grid == {(i, p, s, c) for i in ("biden", "obama") for p in PROMPTS for s in (0, 1) for c in (0.5, 1.0)}
    groups = {}
    for row in rows:
        assert set(row["similarity"]) == set(row["no_face"]) == {"standin_recognizer", "sface"}
        image = out / row["path"]
        # Each row holds the scores of the image it names, against its identity's photo, and its prompt.
        for scorer in scorers:
            expected = scorer.score(image, two_people / row["face"])
            assert (row["similarity"][scorer.name], row["no_face"][scorer.name]) == (
                expected.similarity,
                expected.no_face,
            )
            assert row["similarity"][scorer.name] == 0.0 or not row["no_face"][scorer.name]
        assert row["clip_t"] == pytest.approx(clip.score([image], [row["prompt"]])[0], abs=1e-5)
        groups.setdefault((row["scale"], row["identity"], row["prompt_index"]), []).append(row)
        settings = read_settings(image)
        assert (settings["identity"], settings["prompt"], settings["seed"], settings["scale"]) == (
            row["identity"],
            row["prompt"],
            row["seed"],
            row["scale"],
        )
        photo = two_people / row["face"]  # the PNG names it by name and sha256, never by its path
        sha256 = hashlib.sha256(photo.read_bytes()).hexdigest()
        assert settings["num_inference_steps"] == 2 and settings["face"] == [{"name": photo.name, "sha256": sha256}]
        with Image.open(image) as im:
            assert im.size == (24, 16)
    # Any image of the grid reproduces alone from its own metadata.
    from faceid.settings import GenerationSettings

    image = out / rows[-1]["path"]
    again = pipe(face=two_people / rows[-1]["face"], settings=GenerationSettings.from_png(image)).images[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(image)))
    # Diversity: of the seeds of one identity, prompt and scale, the same value on each of their rows.
    assert len(groups) == 8
    for members in groups.values():
        expected = diversity(clip.image_embeddings([out / r["path"] for r in members]))
        assert all(r["diversity"] == pytest.approx(expected, abs=1e-5) for r in members) and expected > 0
    # The scale changes the images (the adapter acts), the seed changes them too.
    first = {(r["identity"], r["prompt_index"], r["seed"], r["scale"]): out / r["path"] for r in rows}
    pixels = {k: np.asarray(Image.open(p), dtype=np.int16) for k, p in first.items()}
    assert np.abs(pixels[("obama", 0, 0, 0.5)] - pixels[("obama", 0, 0, 1.0)]).max() > 0
    assert np.abs(pixels[("obama", 0, 0, 1.0)] - pixels[("obama", 0, 1, 1.0)]).max() > 0

    summary = json.loads((out / "summary.json").read_text())
    assert [g["scale"] for g in summary["by_scale"]] == [0.5, 1.0]
    assert all(g["n"] == 8 for g in summary["by_scale"]) and len(summary["by_prompt"]) == 4
    assert len(summary["by_identity"]) == 4 and summary["overall"]["n"] == 16
    assert [g["name"] for g in summary["by_identity"]] == ["biden", "obama"] * 2
    for group in summary["by_scale"]:
        assert set(group["identity"]) == {"standin_recognizer", "sface"}
        assert 0.0 <= group["identity"]["sface"]["detection_rate"] <= 1.0
        assert group["clip_t"]["n"] == 8 and group["diversity"]["n"] == 4  # 2 identities x 2 prompts
    assert summary["settings"]["seeds"] == [0, 1] and summary["settings"]["prompts"] == PROMPTS
    markdown = (out / "summary.md").read_text()
    assert "## Per adapter scale" in markdown and PROMPTS[1] in markdown and "sface" in markdown
    assert "| obama | " in markdown and "{" not in markdown  # the per-identity rows are named
    assert [p.name for p in result.plots] == ["curve.png", "prompts.png", "histograms.png"]
    for plot in result.plots:
        with Image.open(plot) as im:
            assert im.format == "PNG" and min(im.size) > 100

    # Second run: nothing is generated again, no image file is touched, the results are the same.
    mtimes = {p: p.stat().st_mtime_ns for p in first.values()}
    again = run()
    assert (again.generated, again.reused, counting.images) == (0, 16, 16)
    assert {p: p.stat().st_mtime_ns for p in first.values()} == mtimes
    assert again.rows == rows

    # A missing image is made again, alone, and identical (seeds are per image, not per batch).
    lost = first[("biden", 1, 1, 0.5)]
    lost.unlink()
    third = run()
    assert (third.generated, third.reused, counting.images) == (1, 15, 17)
    assert np.abs(np.asarray(Image.open(lost), dtype=np.int16) - pixels[("biden", 1, 1, 0.5)]).max() <= 1

    # Other settings in the same folder: refused before anything is generated (not even the images of
    # the new scale 0.25, which come first in the grid).
    with pytest.raises(FaceIDError, match="other settings"):
        run(scales=(0.25, 0.5, 1.0), settings={**TINY["settings"], "num_inference_steps": 3})
    assert counting.images == 17 and not (out / "images" / "scale_0.25").exists()
    replaced = run(scales=(0.5,), settings={**TINY["settings"], "num_inference_steps": 3}, overwrite=True)
    assert (replaced.generated, replaced.reused, counting.images) == (8, 0, 25)
    assert read_settings(first[("obama", 0, 0, 0.5)])["num_inference_steps"] == 3
    assert any("16 image(s) generated" in m for m in messages)


def test_run_eval_checks_inputs_before_generating(tmp_path, pipe, analyzer, two_people, faces_dir):
    counting = CountingPipe(pipe)
    with pytest.raises(FaceIDError, match="no photos"):
        run_eval(counting, tmp_path, PROMPTS, 1, [1.0], tmp_path / "out", [IdentityScorer(analyzer)], **TINY)
    no_face = tmp_path / "people"
    no_face.mkdir()
    shutil.copyfile(faces_dir / "obama.jpg", no_face / "obama.jpg")
    Image.new("RGB", (200, 200), "gray").save(no_face / "nobody.png")
    with pytest.raises(FaceIDError, match="nobody"):
        run_eval(counting, no_face, PROMPTS, 1, [1.0], tmp_path / "out", [IdentityScorer(analyzer)], **TINY)
    assert counting.images == 0 and not (tmp_path / "out").exists()


def test_prompts_seeds_and_scales():
    prompts = load_prompts()
    assert 20 <= len(prompts) <= 30 and len(set(prompts)) == len(prompts)
    assert not any(p.startswith("#") for p in prompts) and all("person" in p for p in prompts)
    assert default_prompts_path().name == "eval_prompts.txt"
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("5,1,9") == [5, 1, 9] and parse_seeds(2) == [0, 1]
    assert parse_scales("0.4,0.7,1") == [0.4, 0.7, 1.0]
    for bad in ("0", "x", "1,1"):
        with pytest.raises(FaceIDError):
            parse_seeds(bad)
    for bad in ("", "a", "-1", "1,1"):
        with pytest.raises(FaceIDError):
            parse_scales(bad)


# ---------------------------------------------------------------------- best_of
class FakeIdentity:
    """An identity scorer whose order is known: similarity by candidate name; 'x' has no face."""

    name = "fake"

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def score(self, image, reference):
        return self.score_many([image], reference)[0]

    def score_many(self, images, reference):
        self.calls += 1
        return [IdentityScore(self.table[i], self.table[i] == 0.0, self.name) for i in images]


class FakeClip:
    name = "fake-clip"

    def __init__(self, table):
        self.table = table

    def score(self, images, prompts):
        return np.array([self.table[i] for i in images], np.float32)


def test_best_of_keeps_the_most_similar_with_clip_breaking_ties():
    identity = FakeIdentity({"a": 0.5, "b": 0.9, "c": 0.5, "x": 0.0, "e": 0.7, "f": 0.5})
    clip = FakeClip({"a": 0.10, "b": 0.20, "c": 0.30, "x": 0.99, "e": 0.00, "f": 0.30})
    candidates = ["a", "b", "c", "x", "e", "f"]

    best = best_of(candidates, "ref.jpg", identity, clip, prompt="a prompt", keep=4)
    assert [image for image, _ in best] == ["b", "e", "c", "f"]  # c and f tie on both: input order
    assert [s.index for _, s in best] == [1, 4, 2, 5]
    assert best[0][1].similarity == 0.9 and best[0][1].clip_t == pytest.approx(0.2) and best[0][1].recognizer == "fake"
    everything = best_of(candidates, "ref.jpg", identity, clip, prompt="a prompt", keep=10)
    assert [image for image, _ in everything] == ["b", "e", "c", "f", "a", "x"]  # no face last
    # Without CLIP-T (or without a prompt) ties keep the input order; the result is deterministic.
    assert [i for i, _ in best_of(candidates, "ref.jpg", identity, keep=3)] == ["b", "e", "a"]
    assert [i for i, _ in best_of(candidates, "ref.jpg", identity, clip, keep=3)] == ["b", "e", "a"]
    assert best_of(candidates, "ref.jpg", identity, clip, "a prompt", 4) == best
    assert best_of([], "ref.jpg", identity) == []
    with pytest.raises(ValueError):
        best_of(candidates, "ref.jpg", identity, keep=0)


def test_best_of_with_real_recognizer_picks_the_person(faces_dir):
    scorer = sface_scorer()
    candidates = [faces_dir / "biden.jpg", Image.new("RGB", (64, 64)), faces_dir / "obama2.jpg"]
    (image, score), (second, _) = best_of(candidates, faces_dir / "obama.jpg", scorer, keep=2)
    assert image == faces_dir / "obama2.jpg" and score.index == 2 and not score.no_face
    assert second == faces_dir / "biden.jpg"


# ---------------------------------------------------------------------- score_folder and the commands
def test_score_folder_on_existing_images(tmp_path, faces_dir, analyzer, tiny_clip_dir):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(faces_dir / "obama.jpg", folder / "same.jpg")  # the reference photo itself
    shutil.copyfile(faces_dir / "obama2.jpg", folder / "obama2.jpg")
    shutil.copyfile(faces_dir / "biden.jpg", folder / "sub" / "biden.jpg")
    save_png(Image.new("RGB", (64, 48), "gray"), folder / "gen.png", {"prompt": "a gray square", "seed": 1})
    Image.new("RGB", (8, 8)).save(folder / "contact_sheet_s1.png")  # faceid's contact sheets are left out
    (folder / "notes.txt").write_text("not an image")
    scorers = [IdentityScorer(analyzer), sface_scorer()]
    clip = ClipTextScorer(tiny_clip_dir, device="cpu")

    rows = score_folder(folder, faces_dir / "obama.jpg", scorers, clip)
    by_path = {r["path"]: r for r in rows}
    assert sorted(by_path) == ["gen.png", "obama2.jpg", "same.jpg", "sub/biden.jpg"]
    # The photo against itself: 1 for every recognizer. Another photo of the same man scores well above
    # another man for SFace (the stand-in recognizer knows no identities: only the first holds for it).
    assert by_path["same.jpg"]["similarity"] == pytest.approx({"standin_recognizer": 1.0, "sface": 1.0}, abs=1e-5)
    assert by_path["obama2.jpg"]["similarity"]["sface"] > by_path["sub/biden.jpg"]["similarity"]["sface"] + 0.3
    assert by_path["obama2.jpg"]["similarity"]["sface"] < 1.0 - 1e-3
    assert by_path["gen.png"]["no_face"] == {"standin_recognizer": True, "sface": True}
    assert by_path["gen.png"]["similarity"] == {"standin_recognizer": 0.0, "sface": 0.0}
    # CLIP-T with the prompt stored in the PNG (a JPEG has none), or the one given.
    stored_prompt = clip.score([folder / "gen.png"], ["a gray square"])[0]
    assert by_path["gen.png"]["prompt"] == "a gray square"
    assert by_path["gen.png"]["clip_t"] == pytest.approx(stored_prompt, abs=1e-5)
    assert by_path["obama2.jpg"]["clip_t"] is None  # a JPEG has no stored prompt
    with_prompt = score_folder(folder, faces_dir / "obama.jpg", scorers[1:], clip, prompt="a man in a suit")
    assert all(r["clip_t"] is not None and r["prompt"] == "a man in a suit" for r in with_prompt)
    given = {r["path"]: r["clip_t"] for r in with_prompt}
    assert given["gen.png"] == pytest.approx(clip.score([folder / "gen.png"], ["a man in a suit"])[0], abs=1e-5)
    assert abs(given["gen.png"] - stored_prompt) > 1e-4


def test_eval_and_score_commands(tmp_path, capsys, tiny_models, face_models_dir, faces_dir, tiny_clip_dir):
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copyfile(faces_dir / "obama.jpg", faces / "obama.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na photo of a person\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        ["--faces", str(faces), "--prompts", str(prompts), "--seeds", "1", "--scales", "0.5,1", "--out", str(out)]
        + ["--base-model", str(tiny_models.sd15)]
        + ["--adapter", str(tiny_models.adapter("faceid", "safetensors"))]
        + ["--face-models", str(face_models_dir), "--clip", str(tiny_clip_dir), "--device", "cpu"]
        + ["--steps", "2", "--width", "24", "--height", "16"]
    )
    assert cmd_eval(args) == 0
    printed = capsys.readouterr().out
    assert "1 identities x 1 prompts x 1 seeds x 2 scales = 2 images" in printed and "scale 0.5:" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["scale"], r["seed"]) for r in rows] == [(0.5, 0), (1.0, 0)]
    stored = read_settings(out / rows[0]["path"])  # the local adapter file by its name and sha256, not its path
    assert stored["model_files"]["adapter"]["name"] == "faceid.safetensors" and "adapter" not in stored

    parser = argparse.ArgumentParser()
    add_score_arguments(parser)
    jsonl = tmp_path / "scores.jsonl"
    args = parser.parse_args(
        [str(out / "images"), "--face", str(faces_dir / "obama2.jpg"), "--face-models", str(face_models_dir)]
        + ["--clip", str(tiny_clip_dir), "--clip-device", "cpu", "--out", str(jsonl)]
    )
    assert cmd_score(args) == 0
    printed = capsys.readouterr().out
    assert "scale_0.5/obama/p00_s0.png" in printed and "2 of 2 image(s)" in printed and "CLIP-T" in printed
    assert len(jsonl.read_text().splitlines()) == 2

    with pytest.raises(FaceIDError, match="recognizers"):
        cmd_score(parser.parse_args([str(out / "images"), "--face", str(faces / "obama.jpg"), "--recognizers", "x"]))


# ---------------------------------------------------------------------- several people in one picture
def _pair(faces_dir, left="obama.jpg", right="biden.jpg"):
    """A real two-person picture: two photos pasted side by side."""
    a, b = (Image.open(faces_dir / name).convert("RGB") for name in (left, right))
    pair = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), "white")
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width, 0))
    return pair, a.width


def test_run_eval_with_a_group_scores_each_person(tmp_path, pipe, analyzer, two_people, faces_dir):
    """A group case beside the single identities: generated with its regions (reproducible from the PNG),
    each person scored on their own face; with a real two-person picture in place of a generated one, each
    person gets their face. Single-person rows keep their form."""
    out = tmp_path / "eval"
    scorers = [IdentityScorer(analyzer), sface_scorer()]
    options = {"groups": ["obama,biden"], "plots": True, **TINY}
    result = run_eval(pipe, two_people, PROMPTS[:1], 1, [1.0], out, scorers, None, **options)
    assert result.generated == 3 and [r["identity"] for r in result.rows] == ["biden", "obama", "obama+biden"]
    single, group = result.rows[1], result.rows[2]
    assert "people" not in single and single["face"] == "obama.jpg" and set(single) >= {"similarity", "no_face"}
    assert group["face"] == ["obama.jpg", "biden.jpg"] and [p["identity"] for p in group["people"]] == [
        "obama",
        "biden",
    ]
    image = out / group["path"]
    stored = read_settings(image)
    assert (
        stored["regions"] == "auto" and stored["people"] == ["obama", "biden"] and stored["identity"] == "obama+biden"
    )
    assert [face["name"] for face in stored["face"]] == ["obama.jpg", "biden.jpg"]
    again = pipe(
        face=[two_people / "obama.jpg", two_people / "biden.jpg"],
        regions="auto",
        seed=0,
        prompt=PROMPTS[0],
        **TINY["settings"],
    )
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(Image.open(image)))
    # A 24x16 picture has no face: both people not found, the picture scores 0.
    assert all(p["no_face"] == {"standin_recognizer": True, "sface": True} for p in group["people"])
    assert group["similarity"] == group["similarity_min"] == {"standin_recognizer": 0.0, "sface": 0.0}

    # A real two-person picture in that image's place (same settings, so the next run keeps and scores it).
    pair, cut = _pair(faces_dir, "obama2.jpg", "biden.jpg")
    save_png(pair, image, stored)
    rescored = run_eval(pipe, two_people, PROMPTS[:1], 1, [1.0], out, scorers, None, **options)
    assert rescored.generated == 0
    group = rescored.rows[2]
    obama, biden = group["people"]
    for recognizer in ("standin_recognizer", "sface"):
        assert not obama["no_face"][recognizer] and not biden["no_face"][recognizer]
        assert group["extra_faces"][recognizer] == 0
    # SFace tells the two apart: each gets the face on their side, and Biden's is his own photo.
    assert obama["box"]["sface"][2] <= cut + 1 < biden["box"]["sface"][0] + 1
    assert obama["similarity"]["sface"] > 0.5 and biden["similarity"]["sface"] > 0.9
    assert group["similarity"]["sface"] == pytest.approx(
        (obama["similarity"]["sface"] + biden["similarity"]["sface"]) / 2
    )
    assert group["similarity_min"]["sface"] == obama["similarity"]["sface"]

    summary = rescored.summary
    assert summary["settings"]["groups"] == ["obama+biden"]
    people = {(g["name"], g["person"]): g for g in summary["by_person"]}
    assert set(people) == {("obama+biden", "obama"), ("obama+biden", "biden")}
    assert people[("obama+biden", "biden")]["identity"]["sface"]["mean"] == biden["similarity"]["sface"]
    weakest = summary["by_scale"][0]["identity"]["sface"]["weakest"]
    singles = [r["similarity"]["sface"] for r in rescored.rows[:2]]
    assert weakest == pytest.approx(np.mean(singles + [obama["similarity"]["sface"]]))
    markdown = (out / "summary.md").read_text()
    assert "## Per person in group pictures" in markdown and "| obama+biden | biden |" in markdown
    assert "weakest person" in markdown
    assert [p.name for p in rescored.plots] == ["curve.png", "prompts.png", "histograms.png", "people.png"]
    with pytest.raises(FaceIDError, match="no photo of carter"):
        run_eval(pipe, two_people, PROMPTS[:1], 1, [1.0], out, scorers, None, groups=["obama,carter"], **TINY)


def test_score_command_rates_each_person_of_a_group_picture(tmp_path, capsys, faces_dir):
    """``faceid score --face A --face B``: one line per image and person, in either order of the photos; a
    person missing from a picture is 'not found'; the rows (--out) carry person, box and extra faces."""
    images = tmp_path / "images"
    images.mkdir()
    pair, cut = _pair(faces_dir)
    pair.save(images / "pair.png")
    shutil.copyfile(faces_dir / "obama.jpg", images / "only_obama.jpg")
    parser = argparse.ArgumentParser()
    add_score_arguments(parser)
    for order in (("obama2", "biden"), ("biden", "obama2")):
        jsonl = tmp_path / f"{order[0]}.jsonl"
        faces = [arg for name in order for arg in ("--face", str(faces_dir / f"{name}.jpg"))]
        args = parser.parse_args([str(images), *faces, "--recognizers", "sface", "--no-clip", "--out", str(jsonl)])
        assert cmd_score(args) == 0
        printed = capsys.readouterr().out
        print(printed)
        lines = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines()}
        assert float(lines[("pair.png", "obama2")][0]) > 0.5 and float(lines[("pair.png", "biden")][0]) > 0.9
        assert lines[("only_obama.jpg", "biden")] == ["not", "found"]
        assert float(lines[("only_obama.jpg", "obama2")][0]) > 0.5
        assert "2 of 2 image(s), 2 people each:" in printed and "weakest person" in printed
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert [(r["path"], r["person"]) for r in rows] == [
            ("only_obama.jpg", order[0]),
            ("only_obama.jpg", order[1]),
            ("pair.png", order[0]),
            ("pair.png", order[1]),
        ]
        by = {(r["path"], r["person"]): r for r in rows}
        assert (
            by[("pair.png", "obama2")]["box"]["sface"][2] <= cut + 1 <= by[("pair.png", "biden")]["box"]["sface"][0] + 1
        )
        assert by[("only_obama.jpg", "biden")]["box"] == {"sface": None}
        assert all(r["extra_faces"] == {"sface": 0} for r in rows)
    same_name = ["--face", str(faces_dir / "obama.jpg"), "--face", str(tmp_path / "obama.jpg")]
    with pytest.raises(FaceIDError, match="both named 'obama'"):
        cmd_score(parser.parse_args([str(images), *same_name, "--recognizers", "sface", "--no-clip"]))

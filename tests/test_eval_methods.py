"""Comparing identity methods in one evaluation (``faceid eval --method faceid,instantid``, ``run_eval(...,
methods=...)``) on the tests' tiny SDXL with its tiny FaceID adapter and a tiny InstantID in the released layout
(``tiny_models.build_instantid``), stand-in face models of both insightface packs, SFace and a tiny CLIP.

Checked: the same grid (2 identities x 2 prompts x 1 seed) runs through each method into its own folder; the
comparison table (summary.json, summary.md, the printed table) has both methods with every column filled and the
right counts, and says which recognizer each method is conditioned on; InstantID's own recognizer (antelopev2's
``glintr100``) is added as a scorer by itself and marked as InstantID's, or, when its pack is not at hand, the
summary says it is missing; the plots (one per method and the
comparison) are PNGs that decode; an image equals what ``FaceIDPipeline`` gives for its stored settings; a second
run resumes (nothing generated, the earlier timing kept); unknown, unwired or unloaded methods, a method without
weights and two FaceID variants are refused before any image.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import load_tiny_sdxl
from face_helpers import make_test_face_models_dir
from PIL import Image
from test_evaluate import CountingPipe

from faceid.cli import main
from faceid.errors import FaceIDError
from faceid.evaluation import run_eval
from faceid.evaluation.methods import settings_for_method, training_recognizer
from faceid.outputs import read_settings
from faceid.scoring import ClipTextScorer, IdentityScorer, sface_scorer
from faceid.settings import GenerationSettings

PROMPTS = ["a photo of a person in a garden", "an oil painting of a person"]
TINY = {"num_inference_steps": 1, "width": 48, "height": 32}


@pytest.fixture(scope="module")
def one_person(tmp_path_factory, faces_dir):
    folder = tmp_path_factory.mktemp("identity")
    shutil.copyfile(faces_dir / "obama.jpg", folder / "obama.jpg")
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_models, both_packs, instantid_dir):
    return load_tiny_sdxl(tiny_models, both_packs, methods={"instantid": instantid_dir})


def _decodes(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100
        image.load()


# ---------------------------------------------------------------------- the command
def test_eval_command_compares_faceid_and_instantid(
    tmp_path, capsys, tiny_models, both_packs, instantid_dir, two_people, tiny_clip_dir, pipe
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "compare"
    argv = ["eval", "--faces", str(two_people), "--prompts", str(prompts), "--seeds", "1", "--scales", "0.6",
            "--method", "faceid,instantid", "--method-weights", f"instantid={instantid_dir}",
            "--identitynet-scale", "0.7", "--out", str(out),
            "--base-model", str(tiny_models.sdxl), "--adapter", str(tiny_models.adapter("faceid-sdxl")),
            "--face-models", str(both_packs), "--clip", str(tiny_clip_dir), "--device", "cpu",
            "--steps", "1", "--width", "48", "--height", "32"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 identities x 2 prompts x 1 seeds x 1 scales x 2 methods (faceid, instantid) = 8 images" in printed

    # The table: both methods, every column filled, the counts right; which recognizer each was trained with.
    summary = json.loads((out / "summary.json").read_text())
    methods = {m["method"]: m for m in summary["methods"]}
    assert list(methods) == ["faceid", "instantid"] and summary["settings"]["methods"] == ["faceid", "instantid"]
    for m in methods.values():
        assert m["n"] == 4 and m["clip_t"]["n"] == 4 and m["seconds_per_image"] > 0
        assert m["timing"]["images"] == 4
        # each method's first call (in this process) is its warm-up: timed apart, the other 3 images give the figure
        timing = m["timing"]
        assert (timing["warm_up_calls"], timing["timed_images"], timing["warm_up_left_out"]) == (1, 3, True)
        per_image = (timing["seconds"] - timing["warm_up_seconds"]) / 3  # the 3 timed calls' seconds, not all 4's
        assert timing["warm_up_seconds"] > 0 and timing["seconds_per_image"] == pytest.approx(per_image)
        for rec in ("arcface", "sface", "glintr100"):  # glintr100 added by the comparison: InstantID's recognizer
            stats = m["identity"][rec]
            assert stats["mean"] is not None and stats["std"] is not None and stats["detection_rate"] is not None
        assert m["clip_t"]["mean"] is not None and [g["scale"] for g in m["by_scale"]] == [0.6]
    assert methods["faceid"]["trained_with"].startswith("w600k_r50.onnx")
    assert methods["instantid"]["trained_with"].startswith("glintr100.onnx")
    assert summary["settings"]["recognizers"] == ["arcface", "sface", "glintr100"]
    assert "missing_recognizers" not in summary
    assert (methods["faceid"]["trained_on"], methods["faceid"]["independent"]) == (["arcface"], ["sface", "glintr100"])
    assert (methods["instantid"]["trained_on"], methods["instantid"]["independent"]) == (
        ["glintr100"],
        ["arcface", "sface"],
    )
    markdown = (out / "summary.md").read_text()
    for text in (markdown, printed):
        table = [
            line for line in text.splitlines() if line.startswith("| faceid |") or line.startswith("| instantid |")
        ]
        assert len(table) >= 2
        faceid_row = next(line for line in table if line.startswith("| faceid |"))
        instantid_row = next(line for line in table if line.startswith("| instantid |"))
        cells = [c.strip() for c in faceid_row.strip("|").split("|")]
        assert len(cells) == 8 and "-" not in cells and cells[2] == "4" and cells[3].endswith(" *")
        assert "*" not in cells[5]
        cells = [c.strip() for c in instantid_row.strip("|").split("|")]
        assert len(cells) == 8 and "-" not in cells and cells[2] == "4" and "*" not in cells[3]
        assert cells[5].endswith(" *")
        assert "arcface similarity | sface similarity | glintr100 similarity | CLIP-T | s / image" in text
        assert "not scored by its training recognizer" not in text

    # The plots: one per method and the comparison, all PNGs that decode.
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["faceid.png", "instantid.png", "methods.png"]
    for plot in (out / "plots").iterdir():
        _decodes(plot)

    # Per method folders, each an evaluation folder of its own; the run folder's results name the method.
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["faceid"] * 4 + ["instantid"] * 4
    for name in ("faceid", "instantid"):
        images = sorted((out / name / "images").rglob("*.png"))
        assert [p.relative_to(out / name).as_posix() for p in images] == [
            f"images/scale_0.6/{who}/p{k:02d}_s0.png" for who in ("biden", "obama") for k in (0, 1)
        ]
        assert len((out / name / "results.jsonl").read_text().splitlines()) == 4
        assert json.loads((out / name / "summary.json").read_text())["overall"]["n"] == 4
        stored = read_settings(images[0])
        assert stored["method"] == name and stored["scale"] == 0.6
        assert stored.get("identitynet_scale") == (0.7 if name == "instantid" else None)  # InstantID's alone
        # the terms of what made it: the method's weights and its face models (both non-commercial here)
        licences = stored["licences"]
        assert stored["commercial_use"] is False and any("antelopev2" in what for what in licences) == (
            name == "instantid"
        )
        weights = "InstantX/InstantID" if name == "instantid" else "h94/IP-Adapter-FaceID"
        assert any(weights in what for what in licences) and all("<https://" in terms for terms in licences.values())

    # Spot check: an InstantID image is what FaceIDPipeline gives for its stored settings.
    image = out / "instantid" / "images" / "scale_0.6" / "obama" / "p01_s0.png"
    again = pipe(face=two_people / "obama.jpg", settings=GenerationSettings.from_png(image)).images[0]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(image)))


def test_the_command_refuses_before_loading(tmp_path, capsys, tiny_models, both_packs, instantid_dir, two_people,
                                           monkeypatch):  # fmt: skip
    from test_methods_table import unwire

    unwire(monkeypatch)  # every method generates now: the refusal of one that does not, on a row made so
    out = tmp_path / "out"
    base = ["eval", "--faces", str(two_people), "--seeds", "1", "--scales", "1", "--out", str(out),
            "--base-model", str(tiny_models.sdxl), "--face-models", str(both_packs), "--no-clip", "--device", "cpu"]  # fmt: skip
    weights = ["--method-weights", f"instantid={instantid_dir}"]
    refusals = {
        ("--method", "faceid,bogus"): "unknown identity method 'bogus'",
        ("--method", "faceid,infiniteyou"): "--method infiniteyou needs --method-weights infiniteyou=FOLDER",
        ("--method", "faceid,pulid-flux", *weights): r"method pulid-flux \(PuLID-FLUX v0.9.1\) is not wired into",
        ("--method", "faceid,faceid-plusv2", *weights): "names 2 FaceID variants.*one FaceID adapter",
        ("--method", "faceid-nonsense"): "unknown FaceID variant 'faceid-nonsense'",
        ("--method", "instantid,instantid", *weights): "names instantid twice",
        tuple(weights): "--method-weights goes with --method",
    }
    import re

    for flags, message in refusals.items():
        assert main(base + list(flags)) == 2, flags
        assert re.search(message, capsys.readouterr().err), (flags, message)
    assert not out.exists()


# ---------------------------------------------------------------------- the Python API
def test_run_eval_refuses_methods_before_generating(tmp_path, tiny_models, both_packs, pipe, two_people):
    plain = CountingPipe(load_tiny_sdxl(tiny_models, both_packs))
    scorers = [sface_scorer()]
    out = tmp_path / "out"

    def run(target, methods, **extra):
        options = {"settings": TINY, "methods": methods, **extra}
        return run_eval(target, two_people, PROMPTS, 1, [1.0], out, scorers, **options)

    with pytest.raises(FaceIDError, match=r"method instantid \(InstantID\) is not loaded on this pipeline"):
        run(plain, ["faceid", "instantid"])
    with pytest.raises(FaceIDError, match="faceid-plusv2 in the method list, but this pipeline's FaceID adapter"):
        run(plain, "faceid-plusv2,instantid")
    with pytest.raises(FaceIDError, match="the evaluation grid sets method itself"):
        run(plain, ["faceid"], **{"settings": {**TINY, "method": "faceid"}})
    with pytest.raises(FaceIDError, match="groups .* are FaceID's: instantid"):
        run(CountingPipe(pipe), ["faceid", "instantid"], groups=["obama,biden"])
    assert plain.images == 0 and not out.exists()


def test_run_eval_with_methods_in_python(tmp_path, pipe, both_packs, one_person, tiny_clip_dir):
    """The API gives what the command does: a result per method, the comparison, its plots; the loaded FaceID
    adapter's variant is a name for it; the shared settings go to the method they belong to; a second run
    resumes."""
    from faceid.faces import FaceAnalyzer

    counting = CountingPipe(pipe)
    scorers = [IdentityScorer(FaceAnalyzer.from_dir(both_packs)), sface_scorer()]
    clip = ClipTextScorer(tiny_clip_dir, device="cpu")
    settings = {**TINY, "lora_scale": 0.5}  # FaceID's: the instantid grid leaves it out
    out = tmp_path / "x"

    def run(**extra):
        return run_eval(counting, one_person, PROMPTS[:1], 1, [1.0], out, scorers, clip, settings=settings,
                        methods=["instantid", "faceid"], **extra)  # fmt: skip

    result = run()
    assert counting.images == 2 and result.generated == 2 and list(result.methods) == ["instantid", "faceid"]
    assert [m["method"] for m in result.summary["methods"]] == ["instantid", "faceid"]
    assert [p.name for p in result.plots] == ["instantid.png", "faceid.png", "methods.png"]
    assert result.methods["faceid"].summary["settings"]["lora_scale"] == 0.5
    assert "lora_scale" not in result.methods["instantid"].summary["settings"]
    assert result.methods["instantid"].summary["settings"]["identitynet_scale"] == 0.8  # the method's default
    assert [r["method"] for r in result.rows] == ["instantid", "faceid"]
    # The two methods made different pictures of the same grid.
    a, b = (np.asarray(Image.open(out / m / "images/scale_1/obama/p00_s0.png"), np.int16)
            for m in ("faceid", "instantid"))  # fmt: skip
    assert np.abs(a - b).max() > 0

    # Again: everything is there, nothing is generated, the timing is the first run's.
    again = run(plots=False)
    assert counting.images == 2 and (again.generated, again.reused) == (0, 2)
    for first, second in zip(result.summary["methods"], again.summary["methods"], strict=True):
        assert second["seconds_per_image"] == first["seconds_per_image"] > 0
        assert second["timing"]["from_earlier_run"] is True
    assert again.summary["methods"][1]["identity"] == result.summary["methods"][1]["identity"]


def test_method_settings_and_training_recognizers():
    from faceid.evaluation.methods import EvalMethod

    shared = GenerationSettings.parse({"num_inference_steps": 3, "lora_scale": 0.4, "identitynet_scale": 0.6})
    faceid = settings_for_method(shared, EvalMethod("faceid-plusv2", "faceid"))
    instantid = settings_for_method(shared, EvalMethod("instantid", "instantid"))
    assert (faceid.method, faceid.lora_scale, faceid.identitynet_scale) == ("faceid", 0.4, None)
    assert (instantid.method, instantid.lora_scale, instantid.identitynet_scale) == ("instantid", None, 0.6)
    assert instantid.num_inference_steps == faceid.num_inference_steps == 3
    assert training_recognizer("faceid") == "w600k_r50" and training_recognizer("instantid") == "glintr100"


def test_a_training_recognizer_not_at_hand_is_said_missing(tmp_path, monkeypatch, both_packs):
    """Without antelopev2 (the analyzer lacks it, the caches are empty), InstantID is not scored by glintr100 and
    the comparison says so; with the pack in the analyzer, the glintr100 scorer is added (once for two methods
    trained on it would be the same: an arcface scorer already there is not added again)."""
    from faceid.evaluation.methods import EvalMethod, compare_methods, methods_markdown, training_scorers
    from faceid.faces import FaceAnalyzer

    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOME", str(tmp_path))  # insightface's ~/.insightface cache: empty too
    entries = [EvalMethod("faceid", "faceid"), EvalMethod("instantid", "instantid")]
    buffalo = FaceAnalyzer.from_dir(make_test_face_models_dir(tmp_path / "buffalo", pack="buffalo_l"))
    scorers = [IdentityScorer(buffalo)]
    added, missing = training_scorers(entries, scorers, buffalo)
    assert added == [] and list(missing) == ["glintr100"] and "antelopev2" in missing["glintr100"]

    stats = {"mean": 0.5, "std": 0.1, "mean_detected": 0.5, "detection_rate": 1.0}
    own = {"settings": {}, "overall": {"n": 1, "identity": {"arcface": stats}, "clip_t": stats}, "by_scale": []}
    comparison = compare_methods(entries, {"faceid": own, "instantid": own}, {"arcface": "w600k_r50"},
                                 {"recognizers": ["arcface"]}, missing)  # fmt: skip
    assert comparison["missing_recognizers"] == missing
    assert [m["training_recognizer"] for m in comparison["methods"]] == ["w600k_r50", "glintr100"]
    lines = [line for line in methods_markdown(comparison).splitlines() if "not scored by" in line]
    assert len(lines) == 1 and lines[0].startswith("- not scored by its training recognizer: instantid (glintr100: ")

    # The pipeline's analyzer with antelopev2 (what loading InstantID gives): glintr100 is added, arcface is not.
    added, missing = training_scorers(entries, scorers, buffalo.with_pack("antelopev2", both_packs))
    assert [s.name for s in added] == ["glintr100"] and missing == {}

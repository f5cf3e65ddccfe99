"""The identity-method table and what reads it: the ``method`` setting, its refusals before any work, the
antelopev2 face pack beside buffalo_l, and ``faceid models``.

* every row names known families and a known face pack, and its files are pinned (a 40-hex commit and a sha256)
  or visibly unpinned, which the download path refuses before downloading anything;
* ``method`` is a setting with a flag, kept by the PNG metadata; an unknown one is refused listing the methods;
* a method on a base model of another family, or without its face models, or not wired into generation yet, is
  refused at the request stage, with no UNet call (and by the service at submit);
* a face models folder holding either pack is recognised, one with the other pack's recognizer refused, and one
  analysis keeps an embedding per pack;
* the antelopev2 download is checked against the release's sha256 like buffalo_l's.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import zipfile

import numpy as np
import pytest
from face_helpers import face_photo, make_test_face_models_dir

from faceid.errors import CheckpointError, FaceIDError, MissingWeightsError
from faceid.faces import FaceAnalyzer, model_files
from faceid.hub import HubFile
from faceid.methods import METHODS, check_method, fetch_method_file, identity_method, unpinned_files
from faceid.settings import GenerationSettings

SIZE = {"width": 24, "height": 16}


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A FACEID_HOME and HOME with no models, so nothing on this machine is found."""
    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "faceid_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """Stand-in face model folders named as buffalo_l, as antelopev2 (YuNet + a stand-in recognizer each), and one
    with both recognizers."""
    root = tmp_path_factory.mktemp("packs")
    folders = {pack: make_test_face_models_dir(root / pack, pack=pack) for pack in ("buffalo_l", "antelopev2")}
    folders["both"] = make_test_face_models_dir(root / "both", pack="antelopev2")
    shutil.copy(folders["buffalo_l"] / "w600k_r50.onnx", folders["both"])
    return folders


# ---------------------------------------------------------------------- the table
def test_every_row_names_known_families_packs_and_pinned_or_visibly_unpinned_files():
    from faceid.families import FAMILIES

    known = set(FAMILIES) | {"FLUX.1"}  # FLUX.1's row is being added to faceid.families beside this table
    assert set(METHODS) == {"faceid", "instantid", "pulid", "pulid-flux", "infiniteyou"}
    assert [m.name for m in METHODS.values() if m.wired] == ["faceid", "instantid", "infiniteyou"]
    for method in METHODS.values():
        assert method.families and set(method.families) <= known, method.name
        assert method.face_pack in model_files.FACE_PACKS, method.name
        assert method.licences and all(licence.url.startswith("https://") for _, licence in method.licences)
        for file in method.all_files:
            assert file.revision is None or re.fullmatch(r"[0-9a-f]{40}", file.revision), file
            assert file.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", file.sha256), file
    assert {m.name for m in METHODS.values() if not m.commercial} == set(METHODS)  # each needs a non-commercial model
    infiniteyou = METHODS["infiniteyou"]
    assert set(infiniteyou.model_sets) == {"aes_stage2", "sim_stage1"} and infiniteyou.default_model_set == "aes_stage2"
    assert {f.subfolder for f in infiniteyou.files_for("sim_stage1")} >= {"infu_flux_v1.0/sim_stage1"}
    with pytest.raises(FaceIDError, match="no model set 'stage3': aes_stage2, sim_stage1"):
        infiniteyou.files_for("stage3")
    unpinned = {(f.repo, f.path_in_repo) for f in unpinned_files()}
    assert ("InstantX/InstantID", "ip-adapter.bin") in unpinned  # no source gave its commit and sha256
    with pytest.raises(FaceIDError, match="unknown identity method 'photomaker': faceid, instantid, pulid"):
        identity_method("photomaker")


def test_an_unpinned_file_is_refused_before_any_download_and_a_pinned_one_is_checked(tmp_path, monkeypatch):
    from faceid import hub

    asked = []
    monkeypatch.setattr(hub, "download", lambda *args, **kwargs: asked.append(args) or local)
    local = tmp_path / "ip-adapter.bin"
    local.write_bytes(b"weights")
    file = METHODS["instantid"].files[0]
    with pytest.raises(CheckpointError) as info:
        fetch_method_file(file)
    message = str(info.value)
    assert "ip-adapter.bin from InstantX/InstantID is unpinned" in message and "commit and sha256" in message
    assert "pass the local file" in message and asked == []
    commit = "0" * 40
    good = HubFile("InstantX/InstantID", "ip-adapter.bin", commit, hashlib.sha256(b"weights").hexdigest(), 7)
    assert fetch_method_file(good) == local and len(asked) == 1
    with pytest.raises(CheckpointError, match="is not the released file"):
        fetch_method_file(HubFile("InstantX/InstantID", "ip-adapter.bin", commit, "f" * 64, 7))


# ---------------------------------------------------------------------- the setting
def test_method_is_a_setting_with_a_flag_kept_by_the_png(tmp_path):
    from PIL import Image

    from faceid.cli import build_parser
    from faceid.cli.flags import settings_from_args
    from faceid.outputs import save_png

    assert GenerationSettings().method == "faceid"
    with pytest.raises(
        FaceIDError, match="method: unknown identity method 'instant-id': choose one of faceid, instantid"
    ):
        GenerationSettings.parse(method="instant-id")
    args = build_parser().parse_args(["generate", "--face", "x.jpg", "--out", "o", "--method", "pulid-flux"])
    settings = settings_from_args(args)
    assert settings.method == "pulid-flux"
    with pytest.raises(SystemExit):  # argparse lists the choices
        build_parser().parse_args(["generate", "--face", "x.jpg", "--out", "o", "--method", "nope"])
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", settings.to_json())
    assert GenerationSettings.from_png(path).method == "pulid-flux"
    assert GenerationSettings.from_png(save_png(Image.new("RGB", (8, 8)), tmp_path / "b.png", {})).method == "faceid"


# ---------------------------------------------------------------------- refused at the request stage
@pytest.fixture(scope="module")
def sdxl_pipe(tiny_models, packs):
    from faceid.pipeline import FaceIDPipeline

    return FaceIDPipeline.from_pretrained(
        tiny_models.sdxl, tiny_models.adapter("faceid-sdxl"), device="cpu", progress=False,
        face_models=packs["both"],
    )  # fmt: skip


def _unet_calls(pipe):
    calls = []
    handle = pipe.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_methods_are_refused_before_any_work(sdxl_pipe, tiny_models, packs, isolated_home):
    from faceid.pipeline import FaceIDPipeline

    face = face_photo("obama.jpg")
    calls, handle = _unet_calls(sdxl_pipe)
    try:
        with pytest.raises(
            FaceIDError,
            match=r"method pulid-flux \(PuLID-FLUX v0.9.1\) runs on FLUX.1 base models.*"
            r"is SDXL: load a FLUX.1 base model.*faceid, instantid, pulid",
        ):
            sdxl_pipe("a portrait", face, method="pulid-flux", num_inference_steps=2, **SIZE)
        with pytest.raises(
            FaceIDError,
            match=r"method pulid \(PuLID v1.1\) is not wired into generation yet.*"
            r"pulid_v1.1.safetensors.*guozinan/PuLID",
        ):
            sdxl_pipe("a portrait", face, method="pulid", num_inference_steps=2, **SIZE)
        assert calls == []
        sdxl_pipe("a portrait", face, num_inference_steps=1, seed=1, **SIZE)  # faceid, as before
        assert len(calls) == 1
    finally:
        handle.remove()
    # Its face models missing: named, with where to get them, before the method's own refusal.
    sd15 = FaceIDPipeline.from_pretrained(
        tiny_models.sd15, tiny_models.adapter("faceid"), device="cpu", progress=False, face_models=packs["buffalo_l"]
    )
    with pytest.raises(FaceIDError, match="method instantid .* runs on SDXL base models.*is SD1.5"):
        sd15("a portrait", face, method="instantid", num_inference_steps=2, **SIZE)
    with pytest.raises(MissingWeightsError) as info:
        check_method("pulid", "SDXL", packs["buffalo_l"])
    message = str(info.value)
    assert "method pulid needs insightface's antelopev2 face models" in message
    assert "holds insightface's buffalo_l pack (w600k_r50.onnx), not antelopev2" in message
    assert model_files.ANTELOPEV2_URL in message and "glintr100.onnx" in message
    with pytest.raises(MissingWeightsError) as info:  # no folder, nothing in the caches
        check_method("instantid", "SDXL")
    assert str(isolated_home / "faceid_home" / "models" / "antelopev2") in str(info.value)
    assert check_method("instantid", "SDXL", packs["antelopev2"]).name == "instantid"
    assert check_method("instantid", "SDXL", None, frozenset({"antelopev2"})).face_pack == "antelopev2"


def test_the_service_refuses_a_method_not_wired_at_submit():
    from faceid.service.capabilities import Capabilities, NotServed
    from faceid.service.inputs import JobInputs

    with pytest.raises(NotServed, match="method: 'pulid' is not wired into generation yet; this server runs"):
        Capabilities().check(GenerationSettings(method="pulid"), JobInputs.parse({}))
    with pytest.raises(NotServed, match="method: this server has no 'instantid' weights loaded; it runs faceid"):
        Capabilities().check(GenerationSettings(method="instantid"), JobInputs.parse({}))  # wired, not loaded
    Capabilities().check(GenerationSettings(method="faceid"), JobInputs.parse({}))


# ---------------------------------------------------------------------- the face packs
def test_a_folder_of_either_pack_is_recognised_and_the_wrong_one_refused(packs, tmp_path):
    ante, buffalo = packs["antelopev2"], packs["buffalo_l"]
    assert model_files.folder_pack(ante) == "antelopev2" and model_files.folder_pack(buffalo) == "buffalo_l"
    assert model_files.models_in_folder(ante, "antelopev2")[1].name == "glintr100.onnx"
    assert model_files.models_in_folder(buffalo)[1].name == "w600k_r50.onnx"
    with pytest.raises(MissingWeightsError) as info:
        FaceAnalyzer.from_pretrained(ante)  # FaceID's buffalo_l asked for, antelopev2 given
    message = str(info.value)
    assert f"{ante} holds insightface's antelopev2 pack (glintr100.onnx), not buffalo_l" in message
    assert model_files.BUFFALO_L_URL in message and "a folder of its own" in message and "\n" not in message
    # A folder with both packs' recognizers serves each; one with a recognizer of no pack serves any.
    both = packs["both"]
    assert model_files.models_in_folder(both, "antelopev2")[1].name == "glintr100.onnx"
    assert model_files.models_in_folder(both, "buffalo_l")[1].name == "w600k_r50.onnx"
    plain = make_test_face_models_dir(tmp_path / "plain")
    assert model_files.models_in_folder(plain, "antelopev2")[1].name == "standin_recognizer.onnx"
    assert model_files.folder_pack(plain) is None


def test_one_analysis_keeps_an_embedding_per_pack(packs):
    analyzer = FaceAnalyzer.from_pretrained(packs["buffalo_l"], extra_packs={"antelopev2": packs["antelopev2"]})
    assert analyzer.pack == "buffalo_l" and set(analyzer.extra_recognizers) == {"antelopev2"}
    face = analyzer.get(face_photo("obama.jpg"))
    assert set(face.embeddings) == set(face.raw_embeddings) == {"buffalo_l", "antelopev2"}
    np.testing.assert_array_equal(face.embedding, face.embeddings["buffalo_l"])  # today's embedding: buffalo_l's
    ante = face.embedding_for("antelopev2")
    assert abs(float(np.linalg.norm(ante)) - 1) < 1e-5 and abs(float(ante @ face.embedding)) < 0.9  # another model
    raw = face.embedding_for("antelopev2", normalised=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), ante, atol=1e-6)
    # The same as an analyzer of antelopev2 alone gives.
    alone = FaceAnalyzer.from_pretrained(packs["antelopev2"], name="antelopev2").get(face_photo("obama.jpg"))
    np.testing.assert_allclose(alone.embedding, ante, atol=1e-6)
    assert set(alone.embeddings) == {"antelopev2"}
    with pytest.raises(FaceIDError, match="embedded without insightface's buffalo_l recognizer.*has: antelopev2"):
        alone.embedding_for("buffalo_l")


def test_the_antelopev2_download_is_checked_like_buffalo_l(isolated_home, monkeypatch, packs):
    assert re.fullmatch(r"[0-9a-f]{64}", model_files.ANTELOPEV2_SHA256) and model_files.ANTELOPEV2_SIZE > 0
    archive = isolated_home / "antelopev2.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # the release nests its files in antelopev2/
        zf.write(packs["antelopev2"] / "glintr100.onnx", "antelopev2/glintr100.onnx")
        zf.write(model_files.default_yunet_path(), "antelopev2/scrfd_10g_bnkps.onnx")
        zf.writestr("antelopev2/genderage.onnx", b"not needed")
    fetched = []
    monkeypatch.setattr(
        model_files, "_download", lambda url, dest, timeout=60.0: fetched.append(url) or shutil.copy(archive, dest)
    )
    target = isolated_home / "faceid_home" / "models" / "antelopev2"
    with pytest.raises(CheckpointError) as info:  # not insightface's file: refused, nothing extracted
        model_files.pretrained_models(name="antelopev2")
    assert f"antelopev2.zip downloaded from {model_files.ANTELOPEV2_URL} is not insightface's release" in str(
        info.value
    )
    assert model_files.ANTELOPEV2_SHA256 in str(info.value) and not any(target.glob("*.onnx"))
    monkeypatch.setattr(model_files, "ANTELOPEV2_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    detector, recognizer = model_files.pretrained_models(name="antelopev2")
    assert (detector.name, recognizer.name) == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
    assert sorted(p.name for p in target.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    assert fetched == [model_files.ANTELOPEV2_URL] * 2
    check_method("instantid", "SDXL")  # now in the cache: ready


# ---------------------------------------------------------------------- faceid models
def test_faceid_models_lists_the_methods_with_families_face_packs_and_licences(capsys):
    from faceid.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    listing = out[out.index("Identity methods") :]
    for method in METHODS.values():
        line = next(line for line in listing.splitlines() if line.startswith(method.name + " "))
        assert method.title in line and " / ".join(method.families) in line
        assert ("[generates]" in line) == method.wired
    assert listing.count("insightface antelopev2 (scrfd_10g_bnkps.onnx + glintr100.onnx)") == 4
    assert "CC BY-NC 4.0" in listing and "FLUX.1 [dev] Non-Commercial License" in listing
    assert listing.count("NOT for commercial use") == len(METHODS)
    assert "3 not pinned" in listing  # InstantID's files, visibly unpinned


def test_the_cli_says_a_method_is_not_wired_before_asking_for_its_weights(capsys, faces_dir, tmp_path):
    """--method pulid: its weights would not help (generation does not run it yet), so that is what is said."""
    from faceid.cli import main

    face = str(faces_dir / "obama.jpg")
    argv = ["generate", "--face", face, "--prompt", "a portrait", "--method", "pulid", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "method pulid (PuLID v1.1) is not wired into generation yet" in error and "--method-weights" not in error
    assert not (tmp_path / "o").exists()

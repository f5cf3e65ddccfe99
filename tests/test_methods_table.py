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
    assert {"faceid", "instantid", "pulid", "infiniteyou"} <= {m.name for m in METHODS.values() if m.wired}
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
    # no source gave InfiniteYou's commits; InstantID's, PuLID's and EVA-CLIP's files are pinned
    assert ("ByteDance/InfiniteYou", "infu_flux_v1.0/aes_stage2/image_proj_model.bin") in unpinned
    assert {repo for repo, _ in unpinned} == {"ByteDance/InfiniteYou"}
    for name in ("instantid", "pulid", "pulid-flux"):
        assert all(f.revision and f.sha256 for f in METHODS[name].all_files), name
    for method in METHODS.values():  # facexlib's files: a release tag's address and a sha256
        for asset in method.assets:
            assert re.fullmatch(r"https://github\.com/xinntao/facexlib/releases/download/v[0-9.]+/\S+", asset.url)
            assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256), asset
    assert {a.filename for a in METHODS["pulid"].assets} == {"parsing_bisenet.pth"}
    assert {a.filename for a in METHODS["infiniteyou"].assets} == {"recognition_arcface_ir_se50.pth"}
    with pytest.raises(FaceIDError, match="unknown identity method 'photomaker': faceid, instantid, pulid"):
        identity_method("photomaker")


def test_an_unpinned_file_is_refused_before_any_download_and_a_pinned_one_is_checked(tmp_path, monkeypatch):
    from faceid import hub

    asked = []
    monkeypatch.setattr(hub, "download", lambda *args, **kwargs: asked.append((*args, kwargs["revision"])) or local)
    local = tmp_path / "ip-adapter.bin"
    local.write_bytes(b"weights")
    file = METHODS["infiniteyou"].files_for()[0]
    with pytest.raises(CheckpointError) as info:
        fetch_method_file(file)
    message = str(info.value)
    assert "image_proj_model.bin from ByteDance/InfiniteYou is unpinned" in message and "commit and sha256" in message
    assert "pass the local file" in message and asked == []
    # A pinned row is downloaded at its commit and refused when the bytes are not the release's.
    pinned = METHODS["instantid"].files[0]
    with pytest.raises(CheckpointError, match="ip-adapter.bin from InstantX/InstantID .*is not the released file"):
        fetch_method_file(pinned)
    assert asked[-1] == ("InstantX/InstantID", "ip-adapter.bin", None, pinned.revision) and len(pinned.revision) == 40
    asked.clear()
    commit = "0" * 40
    good = HubFile("InstantX/InstantID", "ip-adapter.bin", commit, hashlib.sha256(b"weights").hexdigest(), 7)
    assert fetch_method_file(good) == local and len(asked) == 1
    with pytest.raises(CheckpointError, match="is not the released file"):
        fetch_method_file(HubFile("InstantX/InstantID", "ip-adapter.bin", commit, "f" * 64, 7))


def test_a_release_asset_is_fetched_checked_and_kept_only_when_it_is_the_release(tmp_path, monkeypatch):
    """facexlib's files come from GitHub release tags: downloaded (here from a file:// address), kept only when their
    sha256 is the table's; a copy already there is used without a download; offline, a missing one names the URL."""
    from faceid.hub import ReleaseAsset, fetch_asset

    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = tmp_path / "release" / "parsing_bisenet.pth"
    source.parent.mkdir()
    source.write_bytes(b"bisenet weights")
    good = ReleaseAsset(source.as_uri(), hashlib.sha256(b"bisenet weights").hexdigest(), 15)
    kept = fetch_asset(good)
    assert kept == tmp_path / "home" / "models" / "assets" / "parsing_bisenet.pth"
    assert kept.read_bytes() == b"bisenet weights"
    source.unlink()  # the copy kept is used: nothing is downloaded again
    assert fetch_asset(good) == kept
    source.write_bytes(b"something else")
    wrong = ReleaseAsset(source.as_uri(), "0" * 64)
    with pytest.raises(CheckpointError, match=r"parsing_bisenet.pth downloaded from .* is not the released file"):
        fetch_asset(wrong, tmp_path / "other")
    assert not any((tmp_path / "other").iterdir())  # nothing kept, no temporary file left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=r"download file://.*parsing_bisenet.pth \(sha256 0{64}\)"):
        fetch_asset(wrong, tmp_path / "other")


def test_pulid_without_a_folder_loads_the_pinned_files(monkeypatch, tmp_path):
    """``pulid_files(None)``: the checkpoint and EVA-CLIP from the Hub at their pins, BiSeNet from facexlib's tag."""
    from faceid import hub, methods
    from faceid.methods.pulid import pulid_files, pulid_flux_files

    fetched, assets = [], []
    monkeypatch.setattr(methods, "fetch_method_file", lambda f: fetched.append(f) or tmp_path / f.filename)
    monkeypatch.setattr(hub, "fetch_asset", lambda a: assets.append(a) or tmp_path / a.filename)
    checkpoint, eva, parsing = pulid_files(None)
    assert (checkpoint.name, eva.name, parsing.name) == (
        "pulid_v1.1.safetensors", "EVA02_CLIP_L_336_psz14_s6B.pt", "parsing_bisenet.pth")  # fmt: skip
    assert fetched == list(METHODS["pulid"].files) and assets == list(METHODS["pulid"].assets)
    assert pulid_flux_files(None)[0].name == "pulid_flux_v0.9.1.safetensors"


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
            match=r"method pulid \(PuLID v1.1\) is not loaded on this pipeline.*"
            r"guozinan/PuLID's pulid_v1.1.safetensors",
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


def unwire(monkeypatch, name: str = "pulid-flux") -> None:
    """Every method of the table generates now: the refusal of one that does not is checked on a row made so."""
    import dataclasses

    monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], wired=False))


def test_the_service_refuses_a_method_not_wired_at_submit(monkeypatch):
    from faceid.service.capabilities import Capabilities, NotServed
    from faceid.service.inputs import JobInputs

    unwire(monkeypatch)

    with pytest.raises(NotServed, match="method: 'pulid-flux' is not wired into generation yet; this server runs"):
        Capabilities().check(GenerationSettings(method="pulid-flux"), JobInputs.parse({}))
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
    assert listing.count("(pinned, sha256-checked)") == 3  # InstantID, PuLID, PuLID-FLUX
    infiniteyou = listing[listing.index("\ninfiniteyou ") :]
    assert f"{len(METHODS['infiniteyou'].all_files)} not pinned" in infiniteyou  # visibly unpinned
    assert "parsing_bisenet.pth from https://github.com/xinntao/facexlib/releases/download/v0.2.0/" in listing


def test_the_cli_says_a_method_is_not_wired_before_asking_for_its_weights(capsys, faces_dir, tmp_path, monkeypatch):
    """--method pulid-flux as if not wired: its weights would not help, so that is what is said."""
    from faceid.cli import main

    unwire(monkeypatch)

    face = str(faces_dir / "obama.jpg")
    out = str(tmp_path / "o")
    argv = ["generate", "--face", face, "--prompt", "a portrait", "--method", "pulid-flux", "--out", out]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "method pulid-flux (PuLID-FLUX v0.9.1) is not wired into generation yet" in error
    assert "--method-weights" not in error
    assert not (tmp_path / "o").exists()

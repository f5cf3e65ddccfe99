"""The variant table, pinned and verified downloads, and what reads the table (specs, training, the CLI)."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest
import torch

from faceid import hub
from faceid.adapter import initial_state_dict
from faceid.checkpoints import AdapterSpec
from faceid.cli import main
from faceid.errors import CheckpointError, FaceIDError, MissingWeightsError
from faceid.hub import HubFile, fetch
from faceid.openpose import OPENPOSE_BODY, OpenPoseBody
from faceid.projection import PerceiverConfig
from faceid.references import REFERENCE_ADAPTERS, REFERENCE_REVISION
from faceid.train import TrainConfig
from faceid.variants import (
    ADAPTER_REVISION,
    ARCHITECTURES,
    CLIP_VIT_H,
    VARIANTS,
    closest_architecture,
    released,
    resolve_adapter,
)

RELEASED = (
    "faceid-sd15",
    "faceid-plus-sd15",
    "faceid-plusv2-sd15",
    "faceid-portrait-sd15",
    "faceid-portrait-v11-sd15",
    "faceid-sdxl",
    "faceid-plusv2-sdxl",
    "faceid-portrait-sdxl",
)


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "faceid-home"))
    monkeypatch.setattr(hub, "_warned", set())


# ---------------------------------------------------------------------- the table
def test_released_names_and_pinned_files():
    assert tuple(VARIANTS) == RELEASED
    for v in VARIANTS.values():
        for file in v.files:
            assert file.repo == "h94/IP-Adapter-FaceID" and file.revision == ADAPTER_REVISION
            assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.size > 0, file.filename
            assert released(file.filename) is v and released(f"/cache/{file.filename}") is v
        assert (v.lora is not None) == (v.lora_rank is not None)  # Portrait: no LoRA, no twin
        assert v.lora is None or v.lora.filename == v.adapter.filename.replace(".bin", "_lora.safetensors")
        assert (v.image_encoder is CLIP_VIT_H) == v.needs_clip
        assert v.family == ("SDXL" if v.name.endswith("-sdxl") else "SD1.5")
    assert re.fullmatch(r"[0-9a-f]{40}", ADAPTER_REVISION) and re.fullmatch(r"[0-9a-f]{40}", CLIP_VIT_H.revision)
    assert released("faceid-sd15") is VARIANTS["faceid-sd15"] and released("my-adapter.bin") is None
    facts = {n: (v.shortcut, v.combine, v.tokens_per_face) for n, v in VARIANTS.items()}
    assert facts["faceid-plusv2-sd15"] == (True, "mean", 4) and facts["faceid-plus-sd15"] == (False, "mean", 4)
    assert facts["faceid-portrait-sdxl"] == (False, "concat", 16)


def test_specs_match_the_architecture_rows(tiny_unet):
    def spec(**kwargs):
        return AdapterSpec.from_state_dict(initial_state_dict(tiny_unet, **kwargs))

    plus = spec(perceiver=PerceiverConfig(clip_dim=48), lora_rank=4)
    assert [a.name for a in plus.architectures] == ["plus", "plusv2"]  # same tensors
    assert plus.variant == "faceid-plus" and "Plus or PlusV2" in plus.describe()
    assert plus.architecture("ip-adapter-faceid-plusv2_sd15.bin").shortcut
    assert not plus.architecture("ip-adapter-faceid-plus_sd15.bin").shortcut
    assert plus.architecture("mine.bin").name == "plus"
    assert [a.name for a in spec(lora_rank=4).architectures] == ["faceid"]
    portrait = spec(num_tokens=16, lora_rank=None)
    assert portrait.architectures == (ARCHITECTURES["portrait"],) and portrait.architecture().combine == "concat"
    own = spec(num_tokens=8, lora_rank=4)  # fits no row: taken for the generic row of its projection
    assert own.architectures == () and own.variant == "faceid" and "faceid-like" in own.describe()
    assert closest_architecture(False, 4, False).name == "faceid"


# ---------------------------------------------------------------------- pinned, verified downloads
def _fake_download(monkeypatch, path, calls):
    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(path)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hf_hub_download)


def test_download_of_a_release_is_pinned_and_its_hash_refused_when_it_differs(tmp_path, monkeypatch):
    fake = tmp_path / "ip-adapter-faceid_sd15.bin"
    fake.write_bytes(b"not the released weights")
    calls = []
    _fake_download(monkeypatch, fake, calls)
    with pytest.raises(CheckpointError) as info:
        resolve_adapter("faceid-sd15")
    assert calls == [
        ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sd15.bin", {"subfolder": None, "revision": ADAPTER_REVISION,
                                                                 "local_files_only": hub.offline()}),
    ]  # fmt: skip
    message = str(info.value)
    found = hashlib.sha256(fake.read_bytes()).hexdigest()
    assert "ip-adapter-faceid_sd15.bin" in message and VARIANTS["faceid-sd15"].adapter.sha256 in message
    assert found in message and f"delete {fake.resolve()}" in message and "report it" in message


def test_matching_file_is_accepted_and_its_hash_remembered(tmp_path, monkeypatch):
    data = tmp_path / "weights.bin"
    data.write_bytes(b"x" * 1000)
    file = HubFile("someone/repo", "weights.bin", "0" * 40, hashlib.sha256(b"x" * 1000).hexdigest(), 1000)
    _fake_download(monkeypatch, data, [])
    hashed = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*args):
        hashed.append(1)
        return real_sha256(*args)

    monkeypatch.setattr(hub.hashlib, "sha256", counting_sha256)
    assert hub.fetch(file) == data
    assert hub.fetch(file) == data and len(hashed) == 1  # the second start reads the remembered hash

    data.write_bytes(b"y" * 1000)  # same size, new contents and mtime: hashed again, and refused
    with pytest.raises(CheckpointError, match="is not the released file"):
        hub.fetch(file)
    assert len(hashed) == 2

    other = tmp_path / "other.bin"
    other.write_bytes(b"z")
    data.unlink()
    hub.file_sha256(other)
    assert list(hub._read_hash_cache()) == [str(other.resolve())]  # nothing outlives its file


def test_unpinned_file_warns_once(tmp_path, monkeypatch, caplog):
    data = tmp_path / "weights.bin"
    data.write_bytes(b"anything")
    _fake_download(monkeypatch, data, [])
    file = HubFile("someone/repo", "weights.bin", None, None)
    with caplog.at_level(logging.WARNING, logger="faceid.hub"):
        assert hub.fetch(file) == data
        assert hub.fetch(file) == data
    warnings = [r.getMessage() for r in caplog.records]
    assert (
        sum("not hash-pinned" in w for w in warnings) == 1 and sum("not pinned to a commit" in w for w in warnings) == 1
    )


def test_offline_fake_hub_cache(tmp_path, monkeypatch):
    """The real hf_hub_download, offline, on a Hub cache holding the pinned commit's snapshot."""
    import huggingface_hub.constants

    release = VARIANTS["faceid-portrait-sd15"].adapter
    repo = tmp_path / "hub" / "models--h94--IP-Adapter-FaceID"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / ADAPTER_REVISION).mkdir(parents=True)
    blob = repo / "blobs" / release.sha256  # as the Hub cache names LFS blobs, whatever they hold
    blob.write_bytes(b"a truncated download")
    (repo / "snapshots" / ADAPTER_REVISION / release.filename).symlink_to(blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=release.sha256) as info:
        resolve_adapter("faceid-portrait-sd15")
    assert f"delete {blob.resolve()} (and the link" in str(info.value)
    with pytest.raises(MissingWeightsError, match=f"ip-adapter-faceid_sd15.bin at commit {ADAPTER_REVISION}"):
        resolve_adapter("faceid-sd15")  # not in the cache: what to download, at which commit


def _fake_hub_cache(tmp_path, monkeypatch, file, data: bytes):
    """The Hub cache (offline) holding ``file`` at its pinned commit, as ``data``: what hf_hub_download finds."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / f"models--{file.repo.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    blob = repo / "blobs" / file.sha256  # as the Hub cache names LFS blobs, whatever they hold
    blob.write_bytes(data)
    link = repo / "snapshots" / file.revision / file.path_in_repo
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return blob


def test_reference_adapters_and_openpose_weights_are_pinned():
    references = [file for by_family in REFERENCE_ADAPTERS.values() for file in by_family.values()]
    assert len(references) == 6 and {f.revision for f in references} == {REFERENCE_REVISION}
    assert len({f.sha256 for f in references}) == 6  # six different files
    for file in [*references, OPENPOSE_BODY]:
        assert re.fullmatch(r"[0-9a-f]{40}", file.revision), file.filename
        assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.size > 0, file.filename


def test_a_reference_adapter_that_is_not_the_released_file_is_refused(tmp_path, monkeypatch, caplog):
    release = REFERENCE_ADAPTERS["plus-face"]["SD1.5"]
    blob = _fake_hub_cache(tmp_path, monkeypatch, release, b"not the released weights")
    with caplog.at_level(logging.WARNING, logger="faceid.hub"), pytest.raises(CheckpointError) as info:
        fetch(release)  # what FaceIDPipeline.load_reference("plus-face") fetches
    message = str(info.value)
    assert "ip-adapter-plus-face_sd15.bin from h94/IP-Adapter" in message and REFERENCE_REVISION in message
    assert release.sha256 in message and hashlib.sha256(b"not the released weights").hexdigest() in message
    assert f"(24 bytes; the release has {release.size})" in message and f"delete {blob.resolve()}" in message
    assert not caplog.records  # pinned: no "not pinned" warning


def test_openpose_weights_that_are_not_the_released_file_are_refused(tmp_path, monkeypatch):
    blob = _fake_hub_cache(tmp_path, monkeypatch, OPENPOSE_BODY, b"x" * 100)
    with pytest.raises(CheckpointError, match=OPENPOSE_BODY.sha256) as info:
        OpenPoseBody.from_pretrained()  # found at the pinned commit, refused for its hash before it is read
    assert OPENPOSE_BODY.revision in str(info.value) and f"delete {blob.resolve()}" in str(info.value)


def test_image_encoder_is_pinned(monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    from faceid.identity import CLIPFaceEncoder

    seen = {}

    def from_pretrained(repo, **kwargs):
        seen.update(kwargs, repo=repo)
        raise OSError("offline")

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", from_pretrained)
    with pytest.raises(MissingWeightsError, match="h94/IP-Adapter/models/image_encoder"):
        CLIPFaceEncoder.from_pretrained()
    assert seen["repo"] == "h94/IP-Adapter" and seen["subfolder"] == "models/image_encoder"
    assert seen["revision"] == CLIP_VIT_H.revision


# ---------------------------------------------------------------------- training and the CLI read it
def test_training_variants_are_the_table():
    for name in ARCHITECTURES:
        assert TrainConfig.from_file(None, base_model="x", dataset="y", variant=name).variant == name
    with pytest.raises(FaceIDError, match="faceid, plus, plusv2, portrait"):
        TrainConfig.from_file(None, base_model="x", dataset="y", variant="turbo")


def test_models_lists_the_table(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for v in VARIANTS.values():
        assert v.name in listing and v.adapter.filename in listing and v.base_model in listing
        assert v.adapter.sha256[:12] in listing
    assert ADAPTER_REVISION[:7] in listing and CLIP_VIT_H.revision[:7] in listing


def test_models_names_the_variant_of_a_file(tmp_path, capsys, tiny_unet):
    from faceid.checkpoints import save_state_dict

    path = save_state_dict(
        initial_state_dict(tiny_unet, perceiver=PerceiverConfig(clip_dim=48), lora_rank=4), tmp_path / "mine.bin"
    )
    torch.manual_seed(0)
    assert main(["models", str(path)]) == 0
    out = capsys.readouterr().out
    assert "variant plus or plusv2" in out and "cannot tell them apart" in out

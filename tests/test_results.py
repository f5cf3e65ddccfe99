"""faceid.results: what a generated image records, without a local path, and saving a result's images with it."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from faceid.outputs import read_settings
from faceid.results import file_record, image_metadata, matches, save_images
from faceid.settings import GenerationSettings


@pytest.fixture(autouse=True)
def faceid_home(tmp_path, monkeypatch):
    """The model files' hashes are remembered in FACEID_HOME: here, not in the user's cache."""
    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "faceid-home"))


def _files(tmp_path):
    models = tmp_path / "my models"
    (models / "base").mkdir(parents=True)
    lora = models / "style.safetensors"
    lora.write_bytes(b"a lora")
    photo = tmp_path / "me.jpg"
    photo.write_bytes(b"a photo")
    return models / "base", lora, photo


def test_local_models_are_recorded_by_name_and_released_names_and_hub_ids_stay_settings(tmp_path):
    base, lora, photo = _files(tmp_path)
    settings = GenerationSettings(
        prompt=["p one", "p two"],
        num_images_per_prompt=2,
        seed=[1, 2, 3, 4],
        base_model=str(base),
        adapter="faceid-plusv2-sd15",
        vae="stabilityai/sd-vae-ft-mse",
        loras={str(lora): 0.7, "someone/loras": 0.3},
    )
    metadata = image_metadata(settings, 2, {"face": [file_record(photo)]})
    assert str(tmp_path) not in json.dumps(metadata)
    assert (metadata["prompt"], metadata["seed"], metadata["num_images_per_prompt"]) == ("p two", 3, 1)
    assert (metadata["adapter"], metadata["vae"]) == ("faceid-plusv2-sd15", "stabilityai/sd-vae-ft-mse")
    assert metadata["loras"] == {"someone/loras": 0.3} and "base_model" not in metadata
    sha256 = hashlib.sha256(b"a lora").hexdigest()
    assert metadata["model_files"] == {
        "base_model": {"name": "base"},
        "loras": [{"name": "style.safetensors", "sha256": sha256, "weight": 0.7}],
    }
    assert metadata["face"] == [{"name": "me.jpg", "sha256": hashlib.sha256(b"a photo").hexdigest()}]


def test_a_record_matches_the_same_file_or_a_folder_of_its_name(tmp_path):
    base, lora, photo = _files(tmp_path)
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(lora.read_bytes())
    assert matches(file_record(lora), copy)  # the same bytes under another name and folder
    assert not matches(file_record(lora), photo)
    assert not matches(file_record(lora), tmp_path / "gone.safetensors")
    assert matches(file_record(base), tmp_path / "my models" / "base") and not matches(file_record(base), tmp_path)


def test_saved_images_read_back_as_the_settings_of_each_image(tmp_path):
    base, _, _ = _files(tmp_path)
    settings = GenerationSettings(prompt="p", num_images_per_prompt=2, seed=[5, 6], base_model=str(base))
    images = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    paths = save_images(
        images, settings, [tmp_path / "a.png", tmp_path / "b.png"], {"mode": "test"}, [{"rank": 0}, {"rank": 1}]
    )
    stored = [read_settings(path) for path in paths]
    assert [(s["seed"], s["rank"], s["mode"]) for s in stored] == [(5, 0, "test"), (6, 1, "test")]
    assert GenerationSettings.from_png(paths[1]) == settings.for_image(1).replace(base_model=None)
    with pytest.raises(ValueError, match="2 images need as many paths"):
        save_images(images, settings, [tmp_path / "c.png"])

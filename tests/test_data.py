"""Training data: prepare_dataset (face analysis into shards, skips, resume) and FaceDataset.

Runs offline on the real photos in tests/data/faces, with the real YuNet detector and the stand-in
recognizer from face_helpers (deterministic embeddings, no identity meaning).
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from bad_files import corrupt_png
from PIL import Image
from safetensors.numpy import load_file

from faceid.cli.prepare import add_prepare_arguments, cmd_prepare
from faceid.data import (
    FORMAT_VERSION,
    SKIP_REASONS,
    FaceDataset,
    PrepareReport,
    find_images,
    prepare_dataset,
    read_captions,
)
from faceid.errors import FaceIDError
from faceid.faces import FaceAnalyzer
from faceid.images import load_image

# What each file of the test folder is, and what prepare must make of it (None: kept).
EXPECTED = {
    "biden.jpg": None,  # the original photo
    "biden_q30.jpg": None,  # JPEG re-encode at quality 30
    "biden_small.webp": None,  # resized to a third, WebP
    "corrupt.png": "unreadable",
    "empty.jpg": "unreadable",  # 0 bytes
    "no_face.jpg": "no_face",  # skimage's coffee cup
    "notes.jpg": "unreadable",  # a text file named .jpg
    "obama.jpg": None,
    "obama2.jpg": None,
    "obama2_exif.jpg": None,  # pixels stored sideways, EXIF orientation 6 turns them upright
    "obama_crop.png": None,  # cropped around the face
    "obama_flip.png": None,  # mirrored
    "sub/obama2_small.bmp": None,  # in a sub-folder, BMP
    "tiny_face.jpg": "face_too_small",  # a ~30 px face on a large canvas
    "two_faces.jpg": "multiple_faces",  # obama and biden side by side
}
CAPTIONS = {
    "biden.jpg": "a photo of biden",  # metadata.jsonl wins over the biden.txt sidecar
    "obama.jpg": "a photo of obama",
    "obama_flip.png": "mirrored obama",  # "caption" key instead of "text"
    "two_faces.jpg": "two men",
    "obama2.jpg": "obama smiling",  # sidecar .txt
    "biden_q30.jpg": "grainy biden",  # sidecar .txt
    "sub/obama2_small.bmp": "small bmp",  # sub/metadata.csv
}
KEPT = sorted(name for name, reason in EXPECTED.items() if reason is None)
DATA_FILES = ("manifest.jsonl", "skipped.jsonl", "dataset.json")


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def make_image_folder(root: Path, faces_dir: Path) -> Path:
    """The test folder of EXPECTED, with captions from metadata.jsonl, .txt sidecars and a metadata.csv."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    obama, obama2, biden = (load_image(faces_dir / f"{n}.jpg") for n in ("obama", "obama2", "biden"))
    shutil.copyfile(faces_dir / "obama.jpg", root / "obama.jpg")
    shutil.copyfile(faces_dir / "obama2.jpg", root / "obama2.jpg")
    shutil.copyfile(faces_dir / "biden.jpg", root / "biden.jpg")
    _shrink(biden, 700).save(root / "biden_q30.jpg", quality=30)
    _shrink(biden, 735).save(root / "biden_small.webp", quality=90)
    _shrink(obama, 640).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "obama_flip.png")
    obama.crop((250, 0, 730, 560)).save(root / "obama_crop.png")
    _shrink(obama2, 600).save(root / "sub" / "obama2_small.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _shrink(obama2, 640).transpose(Image.Transpose.ROTATE_90).save(root / "obama2_exif.jpg", exif=exif, quality=92)
    Image.fromarray(skimage.data.coffee()).save(root / "no_face.jpg")
    height = 700
    left, right = (im.resize((round(im.width * height / im.height), height)) for im in (obama, biden))
    pair = Image.new("RGB", (left.width + right.width, height), "white")
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width, 0))
    pair.save(root / "two_faces.jpg", quality=92)
    canvas = Image.new("RGB", (640, 480), (200, 200, 200))
    canvas.paste(obama.resize((round(obama.width * 0.12), round(obama.height * 0.12))), (300, 200))
    canvas.save(root / "tiny_face.jpg", quality=95)
    corrupt_png(root / "corrupt.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("these are my notes, not a photo\n")
    shutil.copyfile(root / "obama.jpg", root / ".hidden.jpg")  # hidden files are ignored
    (root / "README.md").write_text("not an image extension: ignored\n")

    (root / "metadata.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"file_name": "biden.jpg", "text": "a photo of biden"}),
                json.dumps({"file_name": "obama.jpg", "text": "a photo of obama"}),
                "",
                json.dumps({"file_name": "obama_flip.png", "caption": "mirrored obama"}),
                json.dumps({"file_name": "two_faces.jpg", "text": "two men"}),
                json.dumps({"file_name": "gone.jpg", "text": "an entry without an image is ignored"}),
            ]
        )
        + "\n"
    )
    (root / "biden.txt").write_text("IGNORED: metadata.jsonl comes first")
    (root / "obama2.txt").write_text("obama smiling\n")
    (root / "biden_q30.txt").write_text("\ufeffgrainy biden  ")
    (root / "sub" / "metadata.csv").write_text('file_name,text\nobama2_small.bmp,"small bmp"\n')
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, faces_dir) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", faces_dir)


@pytest.fixture(scope="module")
def factory(face_models_dir):
    return functools.partial(FaceAnalyzer.from_dir, face_models_dir)


@pytest.fixture(scope="module")
def analyzer(factory) -> FaceAnalyzer:
    return factory()


@pytest.fixture(scope="module")
def prepared(image_folder, factory, tmp_path_factory) -> tuple[Path, PrepareReport]:
    """The test folder prepared with crops, 4 source images per shard, 2 workers."""
    out = tmp_path_factory.mktemp("prepared") / "ds"
    report = prepare_dataset(image_folder, out, factory, with_crops=True, shard_size=4, workers=2, progress=False)
    return out, report


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def dataset_bytes(out: Path) -> dict[str, bytes]:
    """Every file that defines a dataset (not report.json, which holds the run time)."""
    files = {name: (out / name).read_bytes() for name in DATA_FILES}
    files.update({f"shards/{p.name}": p.read_bytes() for p in sorted((out / "shards").iterdir())})
    return files


def counting_factory(factory, calls: list[str], fail_on: dict[str, BaseException] | None = None):
    """A factory whose analyzers record every file they analyze and raise ``fail_on[name]`` for that file."""

    def make():
        analyzer = factory()
        real = analyzer.analyze

        def analyze(path):
            name = Path(path).name
            calls.append(name)
            if fail_on and name in fail_on:
                raise fail_on[name]
            return real(path)

        analyzer.analyze = analyze  # the models (and so the dataset settings) are unchanged
        return analyzer

    return make


# ----------------------------------------------------------------------------------------------
# Finding images and captions


def test_find_images_and_captions(image_folder, tmp_path):
    files = find_images(image_folder)
    assert files == sorted(EXPECTED)  # recursive, sorted, hidden and non-image files ignored
    assert find_images(image_folder, exclude=[image_folder / "sub"]) == [f for f in files if not f.startswith("sub/")]
    captions = read_captions(image_folder, files)
    assert captions == CAPTIONS

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "ok"}\n{"file_name": "b.jpg", text}\n')
    with pytest.raises(FaceIDError, match=r"metadata.jsonl:2: not valid JSON"):
        read_captions(bad, ["a.jpg"])
    (bad / "metadata.jsonl").write_text('{"text": "no file name"}\n')
    with pytest.raises(FaceIDError, match=r'metadata.jsonl:1: no "file_name"'):
        read_captions(bad, ["a.jpg"])
    (bad / "metadata.jsonl").unlink()
    (bad / "metadata.csv").write_text("image,text\na.jpg,hello\n")
    with pytest.raises(FaceIDError, match='no "file_name" column'):
        read_captions(bad, ["a.jpg"])


# ----------------------------------------------------------------------------------------------
# prepare_dataset


def test_prepare_report_and_skipped(prepared, image_folder):
    out, report = prepared
    expected_skips = {r: 0 for r in SKIP_REASONS}
    for reason in EXPECTED.values():
        if reason:
            expected_skips[reason] += 1
    assert report.images == len(EXPECTED)
    assert report.kept == len(KEPT)
    assert report.skipped == expected_skips
    assert report.no_caption == sum(1 for name in KEPT if name not in CAPTIONS)  # exif, crop, webp
    assert report.shards == 4 and report.reused_shards == 0
    assert report.elapsed > 0
    assert json.loads((out / "report.json").read_text()) == report.to_dict()

    summary = report.summary()
    assert f"Prepared {len(KEPT)} of {len(EXPECTED)}" in summary
    assert "3 unreadable" in summary and "1 several faces" in summary and "1 face too small" in summary
    assert "3 kept image(s) have no caption" in summary

    skipped = {s["file_name"]: s for s in read_jsonl(out / "skipped.jsonl")}
    assert {name: s["reason"] for name, s in skipped.items()} == {n: r for n, r in EXPECTED.items() if r}
    assert "not an image file" in skipped["notes.jpg"]["detail"]
    assert "empty" in skipped["empty.jpg"]["detail"]
    assert "2 faces" in skipped["two_faces.jpg"]["detail"]
    assert "64" in skipped["tiny_face.jpg"]["detail"]

    info = json.loads((out / "dataset.json").read_text())
    assert info["format"] == "faceid-dataset" and info["version"] == FORMAT_VERSION
    assert info["status"] == "complete"
    assert info["images_dir"] == str(image_folder.resolve())
    assert info["settings"]["with_crops"] is True and info["settings"]["shard_size"] == 4
    assert info["settings"]["face_models"]["detector"]["type"] == "YuNetDetector"
    assert info["counts"] == {
        "images": len(EXPECTED),
        "kept": len(KEPT),
        "skipped": expected_skips,
        "no_caption": report.no_caption,
        "shards": 4,
    }
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"


def test_manifest_rows_match_shards(prepared, image_folder, analyzer):
    out, _ = prepared
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [m["file_name"] for m in manifest] == KEPT  # file order
    assert {m["file_name"]: m["caption"] for m in manifest if m["caption"]} == {
        n: c for n, c in CAPTIONS.items() if n in KEPT
    }
    shards = {p.name: load_file(p) for p in sorted((out / "shards").glob("shard-*.safetensors"))}
    assert list(shards) == [f"shard-{k:05d}.safetensors" for k in range(4)]
    # Shard k covers source images 4k..4k+3; its rows are the kept ones among them.
    files = find_images(image_folder)
    for k, name in enumerate(shards):
        rows = [m for m in manifest if m["shard"] == f"shards/{name}"]
        assert [m["row"] for m in rows] == list(range(len(rows)))
        assert [m["file_name"] for m in rows] == [f for f in files[4 * k : 4 * k + 4] if f in KEPT]
        tensors = shards[name]
        assert tensors["embeddings"].shape == (len(rows), 512) and tensors["embeddings"].dtype == np.float32
        assert tensors["landmarks"].shape == (len(rows), 5, 2)
        assert tensors["crops_224"].shape == (len(rows), 224, 224, 3) and tensors["crops_224"].dtype == np.uint8
    for m in manifest:
        tensors = shards[Path(m["shard"]).name]
        emb = tensors["embeddings"][m["row"]]
        assert np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
        face = analyzer.analyze(image_folder / m["file_name"])[0]  # the stored row is this image's face
        np.testing.assert_allclose(emb, face.embedding, atol=1e-6)
        np.testing.assert_array_equal(tensors["crops_224"][m["row"]], face.crop_224)
        np.testing.assert_allclose(tensors["landmarks"][m["row"]], face.landmarks, atol=1e-4)
        assert m["box"] == pytest.approx([float(v) for v in face.box], abs=0.01)
        assert m["face_size"] == pytest.approx(float(face.box[2] - face.box[0]), abs=0.1)
        assert m["face_size"] >= 64 and 0.5 < m["score"] <= 1 and m["faces"] == 1
    # The EXIF-rotated copy was analyzed upright: its face box fits the upright (portrait) image.
    exif_row = next(m for m in manifest if m["file_name"] == "obama2_exif.jpg")
    upright = load_image(image_folder / "obama2_exif.jpg")
    assert upright.height > upright.width and exif_row["box"][3] <= upright.height
    # All different images of one photo (flip, crop, re-encode) still give different vectors here.
    all_emb = np.concatenate([t["embeddings"] for t in shards.values()])
    assert len({e.tobytes() for e in all_emb}) == len(KEPT)


def test_multi_face_largest_keeps_two_face_image(image_folder, factory, analyzer, tmp_path):
    report = prepare_dataset(image_folder, tmp_path / "ds", factory, multi_face="largest", workers=1, progress=False)
    assert report.kept == len(KEPT) + 1
    assert report.skipped["multiple_faces"] == 0 and report.shards == 1
    row = next(m for m in read_jsonl(tmp_path / "ds" / "manifest.jsonl") if m["file_name"] == "two_faces.jpg")
    assert row["faces"] == 2 and row["caption"] == "two men"
    faces = analyzer.analyze(image_folder / "two_faces.jpg")
    assert faces[0].area > faces[1].area
    assert row["box"] == pytest.approx([float(v) for v in faces[0].box], abs=0.01)  # the larger (left) face
    emb = load_file(tmp_path / "ds" / row["shard"])["embeddings"][row["row"]]
    np.testing.assert_allclose(emb, faces[0].embedding, atol=1e-6)
    assert "crops_224" not in load_file(tmp_path / "ds" / row["shard"])


def test_resume_after_interrupt_matches_uninterrupted_run(prepared, image_folder, factory, tmp_path):
    reference, _ = prepared  # one uninterrupted run, workers=2
    files = find_images(image_folder)
    out = tmp_path / "ds"
    calls: list[str] = []
    # Interrupted in the middle of the second shard (source images 4..7).
    interrupt = counting_factory(factory, calls, fail_on={Path(files[5]).name: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(image_folder, out, interrupt, with_crops=True, shard_size=4, workers=1, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.safetensors"]
    assert (out / "shards" / "shard-00000.safetensors").read_bytes() == (
        reference / "shards" / "shard-00000.safetensors"
    ).read_bytes()
    assert json.loads((out / "dataset.json").read_text())["status"] == "incomplete"
    assert not (out / "manifest.jsonl").exists()
    with pytest.raises(FaceIDError, match="incomplete"):
        FaceDataset(out)

    calls.clear()
    report = prepare_dataset(
        image_folder, out, counting_factory(factory, calls), with_crops=True, shard_size=4, workers=2, progress=False
    )
    assert sorted(calls) == sorted(Path(f).name for f in files[4:])  # finished shard 0 was not redone
    assert report.reused_shards == 1 and report.kept == len(KEPT)
    assert dataset_bytes(out) == dataset_bytes(reference)

    # Running it again when complete analyzes nothing and changes nothing.
    calls.clear()
    report = prepare_dataset(
        image_folder, out, counting_factory(factory, calls), with_crops=True, shard_size=4, workers=3, progress=False
    )
    assert calls == [] and report.reused_shards == report.shards == 4
    assert dataset_bytes(out) == dataset_bytes(reference)


def test_damaged_shard_and_temp_files_are_redone(prepared, image_folder, factory, tmp_path):
    reference, _ = prepared
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    # As a hard kill could leave them: a half-written temp file, and a shard cut short on disk.
    (out / "shards" / ".shard-00003.safetensors.tmp-1-2").write_bytes(b"partial")
    shard = out / "shards" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    (out / "shards" / "shard-00009.safetensors").write_bytes(b"a shard from a run over more files")
    calls: list[str] = []
    report = prepare_dataset(
        image_folder, out, counting_factory(factory, calls), with_crops=True, shard_size=4, workers=2, progress=False
    )
    assert sorted(calls) == sorted(Path(f).name for f in find_images(image_folder)[8:12])
    assert report.reused_shards == 3
    assert dataset_bytes(out) == dataset_bytes(reference)


def test_changed_settings_are_refused_unless_overwrite(prepared, image_folder, factory, tmp_path):
    reference, _ = prepared
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    before = dataset_bytes(out)
    common = {"shard_size": 4, "workers": 1, "progress": False}
    with pytest.raises(FaceIDError, match=r"other settings \(with_crops: True -> False\).*--overwrite"):
        prepare_dataset(image_folder, out, factory, with_crops=False, **common)
    with pytest.raises(FaceIDError, match="min_face_size: 64 -> 32"):
        prepare_dataset(image_folder, out, factory, with_crops=True, min_face_size=32, **common)
    with pytest.raises(FaceIDError, match="shard_size: 4 -> 8"):
        prepare_dataset(image_folder, out, factory, with_crops=True, shard_size=8, workers=1, progress=False)
    other_images = tmp_path / "other"
    shutil.copytree(image_folder / "sub", other_images)
    with pytest.raises(FaceIDError, match="another images folder"):
        prepare_dataset(other_images, out, factory, with_crops=True, **common)
    assert dataset_bytes(out) == before  # a refused run touches nothing

    report = prepare_dataset(image_folder, out, factory, with_crops=False, overwrite=True, **common)
    assert report.kept == len(KEPT) and report.reused_shards == 0
    assert json.loads((out / "dataset.json").read_text())["settings"]["with_crops"] is False
    assert all("crops_224" not in load_file(p) for p in (out / "shards").glob("*.safetensors"))

    # A folder with other files is not taken over silently; nor is the images folder itself.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FaceIDError, match="not empty"):
        prepare_dataset(image_folder, foreign, factory, **common)
    with pytest.raises(FaceIDError, match="must differ"):
        prepare_dataset(image_folder, image_folder, factory, **common)
    with pytest.raises(FaceIDError, match="not found"):
        prepare_dataset(tmp_path / "missing", tmp_path / "x", factory, **common)
    with pytest.raises(ValueError, match="multi_face"):
        prepare_dataset(image_folder, tmp_path / "x", factory, multi_face="all")


def test_analysis_errors_are_skipped_then_retried(image_folder, factory, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("obama_flip.png", "biden_small.webp", "sub/obama2_small.bmp"):
        shutil.copyfile(image_folder / name, images / Path(name).name)
    out = tmp_path / "ds"
    calls: list[str] = []
    flaky = counting_factory(factory, calls, fail_on={"biden_small.webp": RuntimeError("onnxruntime hiccup")})
    report = prepare_dataset(images, out, flaky, shard_size=1, workers=2, progress=False)
    assert report.kept == 2 and report.skipped["error"] == 1
    (skip,) = read_jsonl(out / "skipped.jsonl")
    assert skip == {"file_name": "biden_small.webp", "reason": "error", "detail": "RuntimeError: onnxruntime hiccup"}
    # Unexpected errors may be transient: a re-run retries those images (and only those).
    calls.clear()
    report = prepare_dataset(images, out, counting_factory(factory, calls), shard_size=1, progress=False)
    assert calls == ["biden_small.webp"] and report.kept == 3 and report.reused_shards == 2

    # An analyzer that fails on everything is a broken set-up, not a dataset full of bad photos.
    broken = counting_factory(factory, [], fail_on={p.name: RuntimeError("model broken") for p in images.iterdir()})
    with pytest.raises(FaceIDError, match="fails on every image.*model broken"):
        prepare_dataset(images, tmp_path / "ds2", broken, shard_size=1, progress=False)


# ----------------------------------------------------------------------------------------------
# FaceDataset


def test_face_dataset_items(prepared, image_folder):
    out, _ = prepared
    ds = FaceDataset(out, resolution=64, with_crops=True)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == len(KEPT)
    manifest = read_jsonl(out / "manifest.jsonl")
    shards = {m["shard"]: load_file(out / m["shard"]) for m in manifest}
    for i, m in enumerate(manifest):
        item = ds[i]
        assert set(item) == {"pixel_values", "caption", "id_embedding", "clip_image"}
        px = item["pixel_values"]
        assert px.shape == (3, 64, 64) and px.dtype == torch.float32
        assert px.min() >= -1.0 and px.max() <= 1.0 and px.max() - px.min() > 1.0
        assert item["caption"] == CAPTIONS.get(m["file_name"], "")
        assert item["id_embedding"].shape == (512,) and item["id_embedding"].dtype == torch.float32
        np.testing.assert_array_equal(item["id_embedding"].numpy(), shards[m["shard"]]["embeddings"][m["row"]])
        assert item["clip_image"].shape == (224, 224, 3) and item["clip_image"].dtype == torch.uint8
        np.testing.assert_array_equal(item["clip_image"].numpy(), shards[m["shard"]]["crops_224"][m["row"]])

    # Pixels: shorter side resized to 64 and the center cropped, checked against OpenCV's area resize.
    i = KEPT.index("biden.jpg")  # 970x2204 portrait: a vertical center crop
    rgb = np.asarray(load_image(image_folder / "biden.jpg"))
    h = round(rgb.shape[0] * 64 / rgb.shape[1])
    ref = cv2.resize(rgb, (64, h), interpolation=cv2.INTER_AREA)[(h - 64) // 2 : (h - 64) // 2 + 64]
    ref = torch.from_numpy(ref.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
    assert (ds[i]["pixel_values"] - ref).abs().mean() < 0.03
    assert ds[-1]["caption"] == ds[len(ds) - 1]["caption"]
    with pytest.raises(IndexError):
        ds[len(ds)]

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["id_embedding"].shape == (3, 512)
    assert batch["clip_image"].shape == (3, 224, 224, 3) and len(batch["caption"]) == 3

    # Picklable after use (DataLoader workers under spawn); the copy reopens the shards itself.
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["id_embedding"], ds[2]["id_embedding"])

    plain = FaceDataset(out)  # defaults: 512 px, no crops
    item = plain[0]
    assert item["pixel_values"].shape == (3, 512, 512) and "clip_image" not in item


def test_face_dataset_hflip(prepared):
    out, _ = prepared
    base = FaceDataset(out, resolution=32, with_crops=True)[1]
    flipping = FaceDataset(out, resolution=32, with_crops=True, hflip=True)
    torch.manual_seed(0)
    flipped_seen = straight_seen = 0
    for _ in range(12):
        item = flipping[1]
        if torch.equal(item["pixel_values"], base["pixel_values"]):
            straight_seen += 1
            assert torch.equal(item["clip_image"], base["clip_image"])
        else:
            flipped_seen += 1
            assert torch.equal(item["pixel_values"], base["pixel_values"].flip(-1))
            assert torch.equal(item["clip_image"], base["clip_image"].flip(1))
        assert torch.equal(item["id_embedding"], base["id_embedding"])
    assert flipped_seen and straight_seen


def test_face_dataset_refuses_bad_folders(prepared, image_folder, factory, tmp_path):
    out, _ = prepared
    with pytest.raises(FaceIDError, match="Dataset folder not found"):
        FaceDataset(tmp_path / "nothing")
    with pytest.raises(FaceIDError, match="not a prepared faceid dataset"):
        FaceDataset(image_folder)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    info = json.loads((old / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps({**info, "version": FORMAT_VERSION + 1}))
    with pytest.raises(FaceIDError, match=f"format version {FORMAT_VERSION + 1}"):
        FaceDataset(old)
    (old / "dataset.json").write_text(json.dumps(info))
    (old / "shards" / "shard-00001.safetensors").unlink()
    with pytest.raises(FaceIDError, match="lacks shards/shard-00001"):
        FaceDataset(old)

    no_crops = tmp_path / "no_crops"
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(image_folder / "obama_flip.png", images / "a.png")
    prepare_dataset(images, no_crops, factory, workers=1, progress=False)
    with pytest.raises(FaceIDError, match="without face crops"):
        FaceDataset(no_crops, with_crops=True)
    assert len(FaceDataset(no_crops)) == 1
    # The images may move: images_dir points the dataset at their new place.
    moved = tmp_path / "moved"
    images.rename(moved)
    assert FaceDataset(no_crops, images_dir=moved, resolution=16)[0]["pixel_values"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------------------------
# Command-line helpers


def test_prepare_arguments_and_run(image_folder, face_models_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="faceid prepare")
    add_prepare_arguments(parser)
    out = tmp_path / "ds"
    args = parser.parse_args(
        [str(image_folder), "--out", str(out), "--face-models", str(face_models_dir), "--workers", "1"]
        + ["--shard-size", "16", "--multi-face", "largest", "--min-face-size", "20", "--with-crops"]
    )
    assert (args.workers, args.shard_size, args.multi_face, args.min_face_size) == (1, 16, "largest", 20)
    assert args.with_crops and not args.overwrite
    assert cmd_prepare(args) == 0
    printed = capsys.readouterr().out
    # min 20 px: the ~30 px face is kept too; largest: the two-face image as well.
    assert f"Prepared {len(KEPT) + 2} of {len(EXPECTED)} image(s)" in printed
    assert len(FaceDataset(out, with_crops=True)) == len(KEPT) + 2

    empty = tmp_path / "no_faces"
    empty.mkdir()
    shutil.copyfile(image_folder / "no_face.jpg", empty / "cup.jpg")
    args = parser.parse_args([str(empty), "--out", str(tmp_path / "e"), "--face-models", str(face_models_dir)])
    assert cmd_prepare(args) == 2
    assert "no image was kept" in capsys.readouterr().err

    for bad in (["--workers", "0"], ["--shard-size", "x"], ["--multi-face", "all"], ["--min-face-size", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args([str(image_folder), "--out", "o", *bad])
    with pytest.raises(SystemExit):
        parser.parse_args([str(image_folder)])  # --out is required


def test_import_stays_light():
    # The CLI imports faceid.data to build its parser (prepare's choices); that must not import torch (seconds).
    code = "import sys, faceid.data; assert 'torch' not in sys.modules and 'cv2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

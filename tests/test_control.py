"""Control images (faceid.control; OpenPose in faceid.openpose, depth in faceid.depth): each kind from real
photos, in the frame of the generated image.

Everything runs offline: faces through the tests' face analyzer, OpenPose through a random-weight body network
or a stand-in of the same interface, depth through a tiny random Depth Anything model built here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pose_helpers import UPRIGHT_PERSON, StandInOpenPose

from faceid.control import KINDS, make_control_image
from faceid.errors import (
    CheckpointError,
    FaceIDError,
    FaceSelectionError,
    ImageError,
    NoFaceError,
    NoPersonError,
)
from faceid.openpose import DETECT_RESOLUTION, OpenPoseBody, detect_people, openpose_people

KPS_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]


@pytest.fixture(scope="module")
def gradient(tmp_path_factory):
    """A photo without a face or a person: a plain colour gradient."""
    x = np.linspace(0, 255, 320)
    rgb = np.stack([np.tile(x, (240, 1)), np.tile(x[::-1], (240, 1)), np.full((240, 320), 90.0)], -1)
    path = tmp_path_factory.mktemp("gradient") / "gradient.png"
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def expected_points(points, photo_size, size, fit):
    """The landmarks' place in the output frame, computed here from the fit rules (crop: cover and centre;
    pad: fit inside and centre)."""
    (w, h), (ow, oh) = photo_size, size
    if fit == "crop":
        s = max(ow / w, oh / h)
        return (points - ((w - ow / s) / 2, (h - oh / s) / 2)) * s
    s = min(ow / w, oh / h)
    return points * s + ((ow - round(w * s)) // 2, (oh - round(h * s)) // 2)


@pytest.mark.parametrize("size, fit", [(None, "crop"), ((512, 768), "crop"), ((768, 512), "pad")])
def test_kps_has_the_landmarks_colours_where_the_face_analysis_found_them(faces_dir, analyzer, size, fit):
    photo = faces_dir / "obama.jpg"
    face = analyzer.get(photo)
    photo_size = Image.open(photo).size
    out = make_control_image("kps", photo, size=size, analyzer=analyzer, fit=fit)
    size = size or photo_size
    assert out.mode == "RGB" and out.size == size
    pixels = np.asarray(out)
    points = expected_points(face.landmarks.astype(np.float64), photo_size, size, fit)
    for (x, y), color in zip(points, KPS_COLORS, strict=True):
        assert tuple(pixels[int(round(y)), int(round(x))]) == color
    # the sticks between them are 60% of their outer point's colour (InstantID's draw_kps)
    eye, nose = points[0], points[2]
    mid = (eye + nose) / 2
    assert tuple(pixels[int(mid[1]), int(mid[0])]) == (153, 0, 0)
    # far from the face it is black: only the sticks and discs are drawn
    box = expected_points(face.box.reshape(2, 2).astype(np.float64), photo_size, size, fit)
    ys, xs = np.nonzero(pixels.any(-1))
    assert xs.min() >= box[0, 0] - 12 and xs.max() <= box[1, 0] + 12
    assert ys.min() >= box[0, 1] - 12 and ys.max() <= box[1, 1] + 12
    assert (pixels[:, :, :].sum(-1) > 0).mean() < 0.05


def test_kps_chooses_the_face_by_index_and_says_when_there_is_none(faces_dir, analyzer, gradient):
    with pytest.raises(FaceSelectionError, match="face index 3"):
        make_control_image("kps", faces_dir / "biden.jpg", analyzer=analyzer, face_index=3)
    with pytest.raises(NoFaceError) as caught:
        make_control_image("kps", gradient, analyzer=analyzer)
    assert "gradient.png" in str(caught.value) and "\n" not in str(caught.value)


def test_kps_of_every_face_for_several_people(faces_dir, analyzer, tmp_path):
    """``face_index="all"``: the keypoints of each person of a group photo, where the analysis found them."""
    obama, biden = (Image.open(faces_dir / name).convert("RGB") for name in ("obama.jpg", "biden.jpg"))
    pair = Image.new("RGB", (obama.width + biden.width, max(obama.height, biden.height)), "white")
    pair.paste(obama, (0, 0))
    pair.paste(biden, (obama.width, 0))
    faces = analyzer.analyze(pair)
    assert len(faces) == 2
    pixels = np.asarray(make_control_image("kps", pair, analyzer=analyzer, face_index="all"))
    for face in faces:
        for (x, y), color in zip(face.landmarks, KPS_COLORS, strict=True):
            assert tuple(pixels[int(round(y)), int(round(x))]) == color
    one = np.asarray(make_control_image("kps", pair, analyzer=analyzer))
    assert 0 < (one.sum(-1) > 0).sum() < (pixels.sum(-1) > 0).sum()


def test_canny_gives_binary_three_channel_edges_of_the_requested_size(faces_dir):
    out = make_control_image("canny", faces_dir / "obama2.jpg", size=(256, 384))
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.size == (256, 384)
    assert set(np.unique(pixels)) == {0, 255}
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert 0.01 < (pixels[..., 0] > 0).mean() < 0.5
    # higher thresholds keep fewer edges
    strict = np.asarray(make_control_image("canny", faces_dir / "obama2.jpg", size=(256, 384), high_threshold=400))
    assert 0 < (strict > 0).sum() < (pixels > 0).sum()


def test_image_kind_letterboxes_the_photo_itself(faces_dir):
    photo = Image.open(faces_dir / "obama.jpg").convert("RGB")
    out = make_control_image("image", photo, size=(400, 200), fit="pad")
    pixels = np.asarray(out)
    width = round(photo.width * 200 / photo.height)
    left = (400 - width) // 2
    assert out.size == (400, 200)
    assert not pixels[:, : left - 1].any() and not pixels[:, left + width + 1 :].any()
    assert np.abs(pixels[:, left + 2 : left + width - 2].astype(int).mean() - np.asarray(photo).mean()) < 5


def test_pose_on_a_photo_without_a_person_is_a_clear_error(gradient):
    torch.manual_seed(0)
    body = OpenPoseBody(OpenPoseBody.network())  # random weights: the real network and decoding
    with pytest.raises(NoPersonError) as caught:
        make_control_image("pose", gradient, pose_model=body)
    assert str(caught.value) == (
        f"no person found in {gradient} for a pose control image; give a photo with a person, or another control kind"
    )


def test_pose_draws_the_person_openpose_finds_in_the_output_frame(gradient):
    points = UPRIGHT_PERSON  # in the 320x240 photo
    body = OpenPoseBody(StandInOpenPose(points, photo_height=240))
    out = make_control_image("pose", gradient, size=(480, 360), pose_model=body)
    pixels = np.asarray(out)
    assert out.size == (480, 360)
    colors = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
              (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
              (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]  # fmt: skip
    for k, (x, y) in enumerate(np.asarray(points) * 1.5):  # 320x240 -> 480x360
        near = pixels[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].reshape(-1, 3)
        assert (near == colors[k]).all(-1).any(), f"keypoint {k} not drawn at ({x}, {y})"
    assert not pixels[:, :100].any()  # nothing left of the person


def test_pose_keypoints_found_on_the_detection_copy_map_back_to_the_photo():
    """The maps are decoded on a copy of the photo 512 px on its longest side; the keypoints come back where the
    person is in the photo, where decoding at the photo's own size puts them, and twice as far out in a photo
    twice the size, each within one pixel of the copy."""
    found = {}
    for factor in (1, 2):
        width, height = 1200 * factor, 900 * factor
        points = np.asarray(UPRIGHT_PERSON, np.float64) * (height / 240)
        body = OpenPoseBody(StandInOpenPose(points, photo_height=height))
        photo = Image.new("RGB", (width, height), (90, 120, 150))
        people = detect_people(body, photo)
        copy_pixel = width / DETECT_RESOLUTION  # one pixel of the detection copy, in photo pixels
        assert len(people) == 1 and np.abs(people[0] - points).max() <= copy_pixel
        found[factor] = people[0]
        if factor == 1:
            full = openpose_people(body, np.asarray(photo))  # the decoding at the photo's own size
            assert len(full) == 1 and np.abs(people[0] - full[0]).max() <= copy_pixel
    assert np.abs(found[2] - 2 * found[1]).max() <= 1

    class Recording(torch.nn.Module):  # what the network is given
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            return torch.zeros(1, 38, x.shape[2] // 8, x.shape[3] // 8), torch.zeros(
                1, 19, x.shape[2] // 8, x.shape[3] // 8
            )

    seen = []
    wide = Image.new("RGB", (3000, 300))  # 512 px wide would leave the copy 51 px tall: it stays 184, like the input
    assert detect_people(Recording(), wide) == [] and openpose_people(Recording(), np.asarray(wide)) == []
    assert seen[0] == seen[1] == (184, 1840)


def test_pose_control_image_of_a_50_megapixel_photo_takes_under_1_gb(tmp_path):
    """A 50-megapixel photo (8660x5773, the most pixels the server accepts) makes its pose control image, at the
    photo's own size, with less than 1 GB of memory on top of what the process held before.

    Measured in a fresh Python process, as the growth of its resident memory (Linux ``/proc/self/status``): the
    peak resident size during the call (``VmHWM``, reset to the current size just before it through
    ``/proc/self/clear_refs``) minus the resident size just before it, after freed heap memory was given back
    to the system (``malloc_trim``). Resident memory counts every allocation that is touched, whoever makes it:
    numpy's arrays, OpenCV's and PIL's buffers, torch's CPU tensors. Where the peak cannot be reset, the
    process's whole peak stands in for it: an even larger number. The network is the stand-in of the other
    tests (the decoding is the same), answering one person whose keypoints are checked in the 50 MP image."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").exists():
        pytest.skip("measures resident memory through Linux's /proc/self/status")
    script = f"""
import ctypes, gc, json, sys
import numpy as np
from PIL import Image
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pose_helpers import UPRIGHT_PERSON, StandInOpenPose
from faceid.control import make_control_image
from faceid.openpose import COLORS, OpenPoseBody

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

# Once on a small photo first: imports, torch's threads and the libraries' first allocations are not the call's.
warm = np.asarray(UPRIGHT_PERSON, np.float64) * (427 / 240)
make_control_image("pose", Image.new("RGB", (640, 427)), pose_model=OpenPoseBody(StandInOpenPose(warm, 427)))
width, height = 8660, 5773
points = np.asarray(UPRIGHT_PERSON, np.float64) * (height / 240)
body = OpenPoseBody(StandInOpenPose(points, photo_height=height))
photo = Image.new("RGB", (width, height), (90, 120, 150))
gc.collect()
ctypes.CDLL(None).malloc_trim(0)
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident size starts again from the current one
except OSError:
    pass
out = make_control_image("pose", photo, pose_model=body)
extra = status("VmHWM") - before
pixels = np.asarray(out)
nearest = []  # how far from each keypoint the nearest pixel of its colour is
for (x, y), color in zip(points, COLORS):
    x0, y0 = int(x) - 100, int(y) - 100
    ys, xs = np.nonzero((pixels[y0 : y0 + 201, x0 : x0 + 201] == color).all(-1))
    nearest.append(float(np.hypot(xs + x0 - x, ys + y0 - y).min()) if len(xs) else None)
print(json.dumps({{"extra": extra, "size": out.size, "nearest": nearest}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["size"] == [8660, 5773]
    assert result["extra"] < 1024**3, f"{result['extra'] / 2**20:.0f} MiB on top for a 50 MP pose control image"
    copy_pixel = 8660 / DETECT_RESOLUTION
    assert all(d is not None and d <= copy_pixel for d in result["nearest"]), result["nearest"]


def test_openpose_weights_load_by_their_released_names(tmp_path):
    torch.manual_seed(1)
    network = OpenPoseBody.network()
    names = network.released_names()
    released = {theirs: network.state_dict()[own] for own, theirs in names.items()}
    assert "Mconv7_stage6_L2.bias" in released and "conv4_4_CPM.weight" in released
    torch.save(released, tmp_path / "body_pose_model.pth")
    loaded = OpenPoseBody.from_pretrained(tmp_path / "body_pose_model.pth").network
    for own, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, network.state_dict()[own])
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not OpenPose's body_pose_model.pth"):
        OpenPoseBody.from_pretrained(tmp_path / "other.pth")


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    """A random-weight Depth Anything (tiny DINOv2 backbone) with its image processor, saved like a Hub model."""
    import transformers
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        head_hidden_size=8,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-depth")
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    processor = getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor
    processor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(folder)
    return folder


def test_depth_is_a_three_channel_image_of_the_requested_size(faces_dir, tiny_depth_model):
    out = make_control_image("depth", faces_dir / "obama.jpg", size=(96, 64), depth_model=tiny_depth_model)
    pixels = np.asarray(out)
    assert out.mode == "RGB" and out.size == (96, 64)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() == 255  # the pipeline's normalised depth, not a blank


def test_unknown_kind_or_option_and_bad_photos_are_clear_errors(tmp_path, faces_dir):
    with pytest.raises(FaceIDError) as caught:
        make_control_image("segmentation", faces_dir / "obama.jpg")
    assert all(kind in str(caught.value) for kind in KINDS)
    with pytest.raises(FaceIDError, match="low_threshold"):
        make_control_image("canny", faces_dir / "obama.jpg", threshold=3)
    with pytest.raises(FaceIDError, match="fit"):
        make_control_image("image", faces_dir / "obama.jpg", fit="stretch")
    with pytest.raises(ImageError, match="not found"):
        make_control_image("canny", tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((faces_dir / "obama.jpg").read_bytes()[:2000])
    with pytest.raises(ImageError, match="corrupt.jpg"):
        make_control_image("kps", corrupt)

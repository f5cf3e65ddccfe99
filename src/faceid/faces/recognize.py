"""Recognition: aligned 112x112 face crops -> identity vectors (buffalo_l's ArcFace, or any ArcFace-style model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import FaceIDError, MissingWeightsError

__all__ = ["ONNXRecognizer", "Recognizer"]


@runtime_checkable
class Recognizer(Protocol):
    """Turns aligned faces into identity vectors.

    ``embed`` takes an [N, 112, 112, 3] uint8 RGB batch of ARCFACE_TEMPLATE-aligned crops and returns
    [N, dim] float32 raw (not normalised) embeddings.
    """

    name: str
    dim: int

    def embed(self, aligned_rgb_batch: np.ndarray) -> np.ndarray: ...


class ONNXRecognizer:
    """An ArcFace-style ONNX recognizer such as buffalo_l's ``w600k_r50.onnx``.

    Preprocessing is insightface's own ``ArcFaceONNX`` (this wraps one): RGB, NCHW, (x - 127.5) / 127.5,
    except for models converted from MXNet that normalise inside the graph (their first nodes are Sub and
    Mul), which get raw 0..255 pixels. Added here: RGB crops in (insightface's ``get_feat`` takes BGR),
    a clear error for a model that is not a 112x112 recognizer, models with a fixed batch of 1, and the
    onnxruntime providers of the caller's choice.
    """

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        path = Path(model_path)
        if not path.is_file():
            raise MissingWeightsError(f"Face recognizer model not found: {path}.")
        self.model_path = path
        self.name = path.stem
        self.session = onnxruntime.InferenceSession(str(path), providers=list(providers or _default_providers()))
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        outputs = self.session.get_outputs()
        if len(shape) != 4 or shape[2:] != [112, 112] or len(outputs) != 1:
            raise FaceIDError(
                f"{path.name} is not a 112x112 face recognizer (input shape {shape}, {len(outputs)} outputs)."
            )
        self._arcface = ArcFaceONNX(model_file=str(path), session=self.session)
        self.input_name = inp.name
        self.output_name = outputs[0].name
        # A model exported with a fixed batch of 1 must be fed one face at a time.
        self._batch_one = isinstance(shape[0], int) and shape[0] == 1
        self.mean, self.std = self._arcface.input_mean, self._arcface.input_std
        out_shape = outputs[0].shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int):
            self.dim = int(out_shape[1])
        else:  # dynamic output width: ask the model
            self.dim = int(self.embed(np.zeros((1, 112, 112, 3), np.uint8)).shape[1])

    def embed(self, aligned_rgb_batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(aligned_rgb_batch)
        if batch.ndim != 4 or batch.shape[1:] != (112, 112, 3):
            raise ValueError(f"expected an [N, 112, 112, 3] RGB batch, got shape {batch.shape}")
        # The network wants RGB (insightface swaps its BGR crops to RGB); ours already are. ArcFaceONNX's
        # forward takes NCHW pixels and applies (x - mean) / std itself.
        pixels = batch.astype(np.float32).transpose(0, 3, 1, 2)
        if self._batch_one:
            outs = [self._arcface.forward(pixels[i : i + 1]) for i in range(len(pixels))]
            out = np.concatenate(outs, axis=0) if outs else np.zeros((0, getattr(self, "dim", 0)), np.float32)
        else:
            out = self._arcface.forward(pixels)
        return np.asarray(out, dtype=np.float32).reshape(len(batch), -1)


def _default_providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available

"""The prepared dataset as training reads it: a ``torch.utils.data.Dataset`` of images, captions and
identity embeddings (and, for Plus, aligned face crops)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ..errors import FaceIDError
from ..images import load_image
from .shards import MANIFEST_FILE, read_dataset_info

__all__ = ["FaceDataset"]


class FaceDataset(torch.utils.data.Dataset):
    """Training examples of a dataset made by :func:`prepare_dataset` (a ``torch.utils.data.Dataset``).

    Each item is a dict:

    * ``pixel_values``: float32 (3, R, R) in [-1, 1]: the image, shorter side resized to ``resolution``
      (bicubic, antialiased), center-cropped to R x R;
    * ``caption``: str (may be empty);
    * ``id_embedding``: float32 (512,), the L2-normalised face embedding;
    * ``clip_image`` (``with_crops=True`` only): uint8 (224, 224, 3) RGB aligned face crop for CLIP.

    ``hflip=True`` mirrors the image (and the face crop) with probability 1/2; the identity embedding is
    kept (identity does not change in a mirror). ``images_dir`` overrides where the images are read from
    (default: the folder the dataset was prepared from). Shards are opened lazily, per process, so the
    dataset works with ``DataLoader(num_workers=...)``.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        resolution: int = 512,
        with_crops: bool = False,
        hflip: bool = False,
        images_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(dataset_dir).expanduser().resolve()
        self.info = read_dataset_info(self.root)
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.with_crops = bool(with_crops)
        self.hflip = bool(hflip)
        if self.with_crops and not self.info["settings"].get("with_crops"):
            raise FaceIDError(
                f"The dataset in {self.root} was prepared without face crops, which with_crops needs (Plus "
                "variants): prepare it again with --with-crops."
            )
        self.images_dir = Path(images_dir).expanduser() if images_dir is not None else Path(self.info["images_dir"])
        manifest = self.root / MANIFEST_FILE
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as exc:
            raise FaceIDError(f"Cannot read {manifest}: {exc}. Re-run the prepare command.") from exc
        missing = sorted({r["shard"] for r in self.records if not (self.root / r["shard"]).is_file()})
        if missing:
            raise FaceIDError(f"The dataset in {self.root} lacks {', '.join(missing)}; re-run the prepare command.")
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        rec = self.records[index]
        image = _resize_center_crop(load_image(self.images_dir / rec["file_name"]), self.resolution)
        pixels = np.asarray(image, dtype=np.uint8)
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        if flip:
            pixels = pixels[:, ::-1]
        pixel_values = torch.from_numpy(np.ascontiguousarray(pixels).transpose(2, 0, 1).copy()).float() / 127.5 - 1.0
        item: dict[str, Any] = {
            "pixel_values": pixel_values,
            "caption": rec["caption"],
            "id_embedding": torch.from_numpy(self._row("embeddings", rec).astype(np.float32)),
        }
        if self.with_crops:
            crop = self._row("crops_224", rec)
            if flip:
                crop = crop[:, ::-1]
            item["clip_image"] = torch.from_numpy(np.ascontiguousarray(crop))
        return item

    def _row(self, tensor: str, rec: dict) -> np.ndarray:
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(rec["shard"])
        if handle is None:
            handle = safe_open(str(self.root / rec["shard"]), framework="numpy")
            self._handles[rec["shard"]] = handle
        return np.array(handle.get_slice(tensor)[int(rec["row"])])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}  # file handles do not pickle (spawned DataLoader workers reopen them)
        return state


def _resize_center_crop(image, size: int):
    """Resize so the shorter side is ``size`` (bicubic, antialiased by PIL), then crop the center square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))

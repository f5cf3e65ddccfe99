"""Training data for IP-Adapter-FaceID: prepare a folder of photos once, then stream it to training.

Training pairs every image with its caption and the identity embedding of the face in it (SPEC
section 5); the Plus variants also need the 224x224 aligned face crop for CLIP. Face analysis is by far
the slowest step, so it runs once. Along the data flow:

* :mod:`~faceid.data.captions`: which photos (:func:`find_images`) and their captions (:func:`read_captions`);
* :mod:`~faceid.data.prepare`: :func:`prepare_dataset` analyses every photo and stores the result;
* :mod:`~faceid.data.shards`: the files of a prepared dataset (shards of embeddings, manifest, report);
* :mod:`~faceid.data.dataset`: :class:`FaceDataset`, the ``torch.utils.data.Dataset`` training reads.

Importing this package imports neither torch nor the face models; ``FaceDataset`` (torch) is imported
on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .captions import find_images, read_captions
from .prepare import MULTI_FACE_POLICIES, SKIP_REASONS, PrepareReport, prepare_dataset
from .shards import FORMAT, FORMAT_VERSION, read_dataset_info

if TYPE_CHECKING:  # pragma: no cover
    from .dataset import FaceDataset

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MULTI_FACE_POLICIES",
    "SKIP_REASONS",
    "FaceDataset",
    "PrepareReport",
    "find_images",
    "prepare_dataset",
    "read_captions",
    "read_dataset_info",
]


def __getattr__(name: str):
    if name == "FaceDataset":  # torch takes seconds to import: only when the dataset is wanted
        from .dataset import FaceDataset

        return FaceDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Depth for control images: relative depth (near = bright) of a photo, from transformers' depth-estimation
pipeline (Depth Anything small by default, pinned by commit and hash)."""

from __future__ import annotations

from .hub import HubFile, fetch, model_not_found

__all__ = ["DEPTH_MODEL", "depth_pipeline"]

#: Default depth model: Depth Anything (small, Apache-2.0), transformers' format, pinned by commit and hash.
DEPTH_MODEL = HubFile(
    "LiheYoung/depth-anything-small-hf",
    "model.safetensors",
    revision="16030b54c8f28bf6a81db58d5d738ac990a3f0a8",
    sha256="7997c812d8964a741eec21e6816ec2db1e442b5109ea2e7db26dcb03c9060ef0",
)


def depth_pipeline(model, device):
    """transformers' depth-estimation pipeline: ``model`` itself when it is one (load it once with
    ``transformers.pipeline("depth-estimation", ...)`` to make many images), else loaded from a name or
    folder; the default :data:`DEPTH_MODEL` is fetched and checked first."""
    if callable(model):
        return model
    from transformers import pipeline

    revision = None
    if model is None:
        fetch(DEPTH_MODEL)  # the weights, checked against their sha256; the pipeline reads the same commit
        model, revision = DEPTH_MODEL.repo, DEPTH_MODEL.revision
    try:
        return pipeline("depth-estimation", model=str(model), revision=revision, device=device or "cpu")
    except (OSError, ValueError) as exc:
        raise model_not_found(str(model), exc) from exc

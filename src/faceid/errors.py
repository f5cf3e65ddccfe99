"""Errors that faceid raises for bad input.

Every error carries a message meant for the person running the tool: what went wrong and what to
do about it. The CLI prints ``str(error)`` as one line and exits non-zero; library users can catch
``FaceIDError`` to handle all of them.
"""

from __future__ import annotations


class FaceIDError(Exception):
    """Base class of every error faceid raises on purpose."""


class ImageError(FaceIDError):
    """A file is missing, is not an image, is truncated, or is too large to decode safely."""


class NoFaceError(FaceIDError):
    """No face was found where one was needed."""


class FaceSelectionError(FaceIDError):
    """A face index was asked for that the image does not have."""


class CheckpointError(FaceIDError):
    """An adapter checkpoint is unreadable or does not fit the base model."""


class MissingWeightsError(FaceIDError):
    """Model weights are not on disk and cannot be downloaded."""


class NoPersonError(FaceIDError):
    """No person was found where one was needed (a pose control image)."""


class MaskError(ImageError):
    """A mask does not fit the image it is for (another size, or nothing to repaint)."""

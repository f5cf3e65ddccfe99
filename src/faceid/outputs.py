"""Writing results: PNGs that remember how they were made, and contact sheets to look at."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from .atomic import atomic_path
from .errors import ImageError

# Text-chunk key holding every setting as JSON; the common ones are also written as plain keys
# ("prompt", "seed", ...) so image viewers and `exiftool` show them directly.
SETTINGS_KEY = "faceid"


def save_png(image: Image.Image, path: str | Path, settings: Mapping[str, object]) -> Path:
    """Save ``image`` with ``settings`` in its text chunks; atomically (a reader never sees half a file)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        if value is not None and not isinstance(value, (dict, list)):
            info.add_text(str(key), str(value))
    info.add_text(SETTINGS_KEY, json.dumps(dict(settings), default=str))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_settings(path: str | Path) -> dict:
    """The settings ``save_png`` stored in a PNG; ``ImageError`` for a file that has none."""
    try:
        with Image.open(path) as image:
            return json.loads(image.text[SETTINGS_KEY])
    except (OSError, KeyError, AttributeError, ValueError) as exc:
        raise ImageError(
            f"{path} holds no faceid settings ({type(exc).__name__}): give a PNG that faceid wrote, with its "
            "metadata intact, or a JSON file of generation settings"
        ) from None


def contact_sheet(
    images: Sequence[Image.Image],
    reference: Image.Image | np.ndarray | None = None,
    columns: int | None = None,
    tile: int = 256,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """A grid of ``images`` (each fitted into a ``tile``-px square), led by the ``reference`` face if given."""
    tiles = []
    if reference is not None:
        ref = Image.fromarray(reference) if isinstance(reference, np.ndarray) else reference
        tiles.append((ref.convert("RGB"), "reference"))
    for i, image in enumerate(images):
        tiles.append((image.convert("RGB"), labels[i] if labels else f"#{i}"))
    columns = columns or min(len(tiles), max(1, math.ceil(math.sqrt(len(tiles)))))
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(tiles):
        # contain() scales both ways: tiny previews are enlarged (nearest, to stay crisp), big ones shrunk.
        small = max(image.size) < tile // 2
        fitted = ImageOps.contain(
            image, (tile, tile - 14), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
        )
        x, y = (i % columns) * tile, (i // columns) * tile
        sheet.paste(fitted, (x + (tile - fitted.width) // 2, y + (tile - 14 - fitted.height) // 2))
        draw.text((x + 4, y + tile - 13), label, fill="black")
    return sheet


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib ``Figure`` as a PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_training(history: Sequence[Mapping[str, float]], path: str | Path) -> Path | None:
    """``training.png``: the loss of every step with its running mean and, below it, the identity gap where
    validation measured it. Needs matplotlib (returns None without it, or without any step)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        return None
    if not history:
        return None
    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    gaps = [(h["step"], 100 * h["identity_gap"]) for h in history if "identity_gap" in h]
    fig = Figure(figsize=(6.4, 6.0 if gaps else 3.6), dpi=100)
    axes = fig.subplots(2 if gaps else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, loss, color="0.75", linewidth=0.8, label="loss of the step")
    window = max(1, len(loss) // 10)
    running = np.convolve(loss, np.ones(window) / window, mode="valid")
    axes[0].plot(steps[window - 1 :], running, color="C0", label=f"mean of {window} steps")
    axes[0].set_ylabel("denoising loss")
    axes[0].legend()
    if gaps:
        axes[1].plot(*zip(*gaps, strict=True), marker="o", color="C1")
        axes[1].axhline(0.0, color="0.5", linewidth=0.8)
        axes[1].set_ylabel("identity gap (%)\nshuffled vs own identity")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    return save_figure(fig, path)

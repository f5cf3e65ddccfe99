"""``faceid embed``: the faces of a photo listed, and the chosen one's embedding and aligned crop saved."""

from __future__ import annotations

import argparse
from pathlib import Path

from .loading import FACE_MODELS_HELP, load_face_analyzer


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``faceid embed``."""
    parser.add_argument("photo", help="a photo with a face")
    parser.add_argument("--face-index", type=int, default=0, help="which face to save (0 = largest)")
    parser.add_argument("--face-models", default=None, help=FACE_MODELS_HELP)
    parser.add_argument("--out", default=".", help="folder for <photo>_face<k>.npy and .png (default: here)")


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..faces import select_face
    from ..images import source_name

    analyzer = load_face_analyzer(args.face_models)
    faces = analyzer.analyze(args.photo)  # once: listing and choosing use the same result
    print_faces(faces, args.face_index)
    face = select_face(faces, args.face_index, source_name(args.photo))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(args.photo).stem}_face{args.face_index}"
    np.save(out / f"{stem}.npy", face.embedding.astype(np.float32))
    Image.fromarray(face.aligned).save(out / f"{stem}.png")
    print(f"saved {out / (stem + '.npy')} ({face.embedding.shape[0]}-d, L2-normalised) and {out / (stem + '.png')}")
    return 0


def print_faces(faces, chosen: int) -> None:
    """One line per face found (largest first), the chosen one starred."""
    for i, found in enumerate(faces):
        x1, y1, x2, y2 = (round(float(v)) for v in found.box)
        marker = "*" if i == chosen else " "
        print(f"{marker} face {i}: box=({x1}, {y1}, {x2}, {y2}) size={x2 - x1}x{y2 - y1} score={found.score:.3f}")

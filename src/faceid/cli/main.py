"""``main()``, the ``faceid`` command, and ``build_parser()``, its parser: one sub-command per module of this package."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import FaceIDError
from .embed import add_embed_arguments, cmd_embed
from .evaluate import add_eval_arguments, cmd_eval
from .generate import add_generate_arguments, cmd_generate
from .logs import configure_logging
from .models import add_models_arguments, cmd_models
from .prepare import add_prepare_arguments, cmd_prepare
from .score import add_score_arguments, cmd_score
from .serve import add_serve_arguments, cmd_serve
from .swap import add_swap_arguments, cmd_swap
from .train import add_train_arguments, cmd_train

# (name, help, the function adding its options, the function running it), in the order --help lists them
COMMANDS = (
    ("generate", "images of the person in a face photo, as a prompt describes", add_generate_arguments, cmd_generate),
    (
        "models",
        "list the released models by name, or say what adapter checkpoint files are",
        add_models_arguments,
        cmd_models,
    ),
    ("prepare", "turn a folder of captioned photos into a training dataset", add_prepare_arguments, cmd_prepare),
    (
        "train",
        "train or fine-tune an adapter on a prepared dataset (multi-GPU: `accelerate launch -m faceid.cli train`)",
        add_train_arguments,
        cmd_train,
    ),
    (
        "eval",
        "generate identities x prompts x seeds (x scales), score likeness and prompt fidelity, report",
        add_eval_arguments,
        cmd_eval,
    ),
    (
        "score",
        "score existing images against a reference face (or several people's)",
        add_score_arguments,
        cmd_score,
    ),
    (
        "serve",
        "the HTTP API: enroll people from photos, queue generations of them",
        add_serve_arguments,
        cmd_serve,
    ),
    (
        "swap",
        "put the person of a face photo into another photo, in place of a face there (inpainting)",
        add_swap_arguments,
        cmd_swap,
    ),
    ("embed", "find the faces in a photo; save the embedding and aligned crop", add_embed_arguments, cmd_embed),
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.debug)
    try:
        return args.func(args) or 0
    except FaceIDError as exc:
        # One line whatever the message (some carry a library's multi-line text).
        print("faceid: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("faceid: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    except Exception as exc:  # a bug or an environment problem: one line, traceback on request
        if args.debug:
            raise
        print(f"faceid: unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceid", description="Identity-preserving image generation (IP-Adapter-FaceID)."
    )
    parser.add_argument("--version", action="version", version=f"faceid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    commands = parser.add_subparsers(title="commands")
    for name, text, add_arguments, run in COMMANDS:
        command = commands.add_parser(name, help=text)
        add_arguments(command)
        command.set_defaults(func=run)
    return parser

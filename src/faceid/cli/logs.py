"""How the command line speaks on stderr: faceid's warnings one line each (``faceid: warning: ...``), other
libraries' log lines, Python warnings and model-loading bars silenced unless ``--debug``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Libraries whose log lines are chatter for a CLI user: notices, deprecations, backend probes (bitsandbytes
# logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported, by peft or
# diffusers, on a machine without the optional `kernels` package). Other libraries' warnings are dropped too
# (the root handler below only passes errors); these are named so that --debug is the one way to see them.
_CHATTY_LIBRARIES = (
    "accelerate",
    "bitsandbytes",
    "diffusers",
    "huggingface_hub",
    "peft",
    "ray.data",
    "torch",
    "transformers",
)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when it writes (tests and pipes swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; sys.stderr wins
        pass


class _OneLineFormatter(logging.Formatter):
    """``<prefix>: warning: message`` on one line, as the CLI writes its errors."""

    def __init__(self, prefix: str | None = None) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        return f"{self.prefix or record.name}: {record.levelname.lower()}: {message}"


_QUIET = {"model_loading": False}  # set by configure_logging: quiet the libraries' model-loading bars


def configure_logging(debug: bool) -> None:
    """faceid's own warnings reach the user, one line each (``faceid: warning: ...``); other libraries'
    log lines and Python warnings only with ``--debug``, except errors; their model-loading bars too (see
    :func:`quiet_model_loading`)."""
    own = logging.getLogger("faceid")
    if not any(isinstance(h, _StderrHandler) for h in own.handlers):  # main() may run more than once
        handler = _StderrHandler()
        handler.setFormatter(_OneLineFormatter("faceid"))
        own.addHandler(handler)
    own.setLevel(logging.DEBUG if debug else logging.WARNING)
    _QUIET["model_loading"] = not debug
    if debug:
        return
    # Read by diffusers and transformers when they are first imported (they reset their loggers then).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        # A handler on the root logger also stops Python's last-resort handler, which prints the warnings
        # of any library that has none of its own.
        handler = _StderrHandler()
        handler.setLevel(logging.ERROR)
        handler.setFormatter(_OneLineFormatter())
        handler.addFilter(lambda record: not _is_faceid(record.name))  # the faceid handler has those
        root.addHandler(handler)
    warnings.filterwarnings("ignore")  # other libraries' deprecation and usage notices
    warnings.filterwarnings("default", module=r"faceid(\.|$)")  # faceid's own, where its code is the caller
    warnings.showwarning = _show_warning


def quiet_model_loading() -> None:
    """Before a command loads diffusers/transformers models: their bars for reading files from disk
    ("Loading pipeline components...", "Loading weights") are chatter; download bars and faceid's own
    progress (denoising steps, prepare) stay. ``--debug`` keeps them all."""
    if not _QUIET["model_loading"]:
        return
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    downloads_shown = not huggingface_hub.utils.are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # this turns huggingface_hub's download bars off too...
    if downloads_shown:
        huggingface_hub.utils.enable_progress_bars()  # ...which stay


def _is_faceid(logger_name: str) -> bool:
    return logger_name == "faceid" or logger_name.startswith("faceid.")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line, like faceid's log warnings."""
    print(f"faceid: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

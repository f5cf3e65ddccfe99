"""The ``faceid`` command line: thin wrappers over the Python API, one module per command.

Every failure a user can cause ends as one line on stderr and a non-zero exit status (2 for bad
input, 1 for anything unexpected; ``--debug`` shows the traceback). Work that can fail (reading the
photo, finding the face, loading the models) happens before anything is written. faceid's warnings are
one line each (``faceid: warning: ...``); other libraries' notices stay quiet unless ``--debug``.

The library modules take plain arguments; the argument parsing of every command lives here: ``main``
(the entry point and the parser), ``flags`` (the generation settings' flags), ``loading`` (the model flags
and what they load), ``logs`` (what reaches stderr), and a module per command.
"""

from __future__ import annotations

from .main import build_parser, main
from .serve import ray_options, serve_parts

__all__ = ["build_parser", "main", "ray_options", "serve_parts"]

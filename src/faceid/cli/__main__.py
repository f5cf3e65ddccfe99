"""``python -m faceid.cli``: the ``faceid`` command (``accelerate launch -m faceid.cli train`` runs it too)."""

import sys

from .main import main

sys.exit(main())

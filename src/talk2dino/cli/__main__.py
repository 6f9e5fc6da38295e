"""``python -m talk2dino.cli ...``: the ``talk2dino`` command."""

from __future__ import annotations

import sys

from talk2dino.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

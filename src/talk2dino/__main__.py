"""``python -m talk2dino ...``: the ``talk2dino`` command (e.g. for ``python -X importtime -m talk2dino models``)."""

from __future__ import annotations

import sys

from talk2dino.cli import main

if __name__ == "__main__":
    sys.exit(main())

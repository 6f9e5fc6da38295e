"""The ``talk2dino`` command line: ``talk2dino.cli:main`` is the console script (house-style §6).

One module per subcommand (`segment`, `serve`, `train`, `eval`, `extract`, `export`, `convert`, `models`), each
with ``add_parser`` and ``run``; `main` assembles them (`talk2dino.cli.main`). Shared pieces: the "Model" and
"Inference" flags (`model_flags`), flags generated from config dataclasses (`flags`), YAML recipes (`recipes`),
and the batch pipeline of ``segment`` (`batch`). Importing this package loads neither torch nor transformers.
"""

from __future__ import annotations

from talk2dino.cli.main import main

__all__ = ["main"]

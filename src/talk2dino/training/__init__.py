"""Training psi with the max-head InfoNCE recipe (method.md §3.4–3.6): `talk2dino train`.

Modules, from the generic to the specific:

- ``loop``: the generic `Trainer` (module, optimiser, loss of a batch, callbacks) and the seeded epoch orders;
- ``loss``: symmetric InfoNCE; ``strategies``: which image embedding each caption is contrasted with (§3.6);
- ``objective``: the loss of a batch of captions and the validation (val loss, recall@K);
- ``run_folder``: the run folder's files, checkpoints, resume checks and log;
- ``run``: `run_train`, the entry point of `talk2dino train`; ``ablation``: the head-selection table.

The features come from `talk2dino.data.features` (written by `talk2dino extract`).
"""

"""Evaluation: the mIoU metric (``metric``) and, above it, the benchmark runner and result records.

Needs the ``eval`` extra for dataset preparation (``pip install 'talk2dino[eval]'``). Nothing in the core
(``models``, ``ops``) imports this package, and ``import talk2dino`` does not load it (house-style §2).
"""

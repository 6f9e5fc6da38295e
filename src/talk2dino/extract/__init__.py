"""Feature extraction on COCO Captions (method.md §3.1–3.3): `talk2dino extract`.

Modules: ``coco`` (the captions JSON and image folder), ``preprocess`` (decode, resize, centre crop, §3.2),
``head_targets`` (the per-head visual targets of one backbone pass, §3.3), ``shards`` (writing shards and
manifests, resume checks, merging torchrun ranks) and ``run`` (`run_extract`, the loop). The on-disk format
they write is `talk2dino.data.features`, which training reads.
"""

"""Feature extraction on COCO Captions (method.md §3.1–3.3): `talk2dino extract`."""

"""Helpers for tests, benchmarks and CI checks (not used at run time): `clip_vocab` writes CLIP tokenizer files."""

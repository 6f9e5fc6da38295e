"""Test and benchmark helper: a CLIP tokenizer folder from OpenAI's BPE list (``bpe_simple_vocab_16e6.txt.gz``).

Not the runtime tokenizer (that is transformers' ``CLIPTokenizer``, loaded by `talk2dino.factory.load_text_encoder`).
The hub repositories ship ``vocab.json`` + ``merges.txt``; this makes the same files from the merge list that the
``clip`` and ``open_clip`` packages bundle, so the tests, the benchmarks and the wheel check build tiny CLIP models
offline.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
NUM_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2
"""Merges taken from the BPE file: the vocabulary less the byte symbols, the same with </w>, start and end tokens."""
_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>"}


def byte_symbols() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table, in vocabulary order: printable bytes as themselves,
    then the remaining bytes mapped to chr(256 + i)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def clip_vocab_from_bpe(bpe_path: str | os.PathLike[str]) -> tuple[dict[str, int], list[str]]:
    """Returns (token -> id for all 49,408 tokens, merge lines) from the gzipped merge list."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1:1 + NUM_MERGES]
    base = byte_symbols()
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += [_SPECIAL["bos_token"], _SPECIAL["eos_token"]]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {CLIP_VOCAB_SIZE} tokens, built {len(vocab)}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(bpe_path: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                         context_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer configs that ``AutoTokenizer`` loads as CLIP's."""
    vocab, merges = clip_vocab_from_bpe(bpe_path)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIAL), encoding="utf-8")
    config = dict(_SPECIAL, tokenizer_class="CLIPTokenizer", model_max_length=context_length, do_lower_case=True,
                  clean_up_tokenization_spaces=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder

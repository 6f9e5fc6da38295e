"""Label text before it reaches the text encoder: splitting a comma-separated list, and the canonical form.

Light (standard library only): the CLI splits and checks ``--labels`` before torch is imported.

- :func:`split_labels` splits ``--labels`` and the server's comma-separated ``labels`` field. An entry may be
  quoted as in CSV, so a label can hold a comma: ``'"cat, dog", bird'`` is the two labels ``cat, dog`` and
  ``bird`` (issue 14: it used to become ``"cat`` and ``dog"``).
- :func:`canonical_label` is what the CLIP tokenizer makes of a label before it cuts it into tokens
  (Unicode NFC, every run of whitespace one space, lower case; its normaliser in ``tokenizer.json``), trimmed.
  Two labels with the same canonical form are the same tokens, so they get bit-identical embeddings and the
  later one can never win a pixel; :meth:`talk2dino.Segmenter.check_labels` refuses them (issue 14:
  ``Person, person`` was accepted). Trimming is a choice, not CLIP's: in a template, blanks at a label's end
  can keep its punctuation apart from the template's (``"! "`` + ``"."``), a difference no one means.
  `Segmenter.class_embeddings` also compares the prompts' actual tokens, which catches the rest
  (``cat.`` and ``cat .``, labels cut at the context length).
- :func:`label_text_problem` names what makes a label's text unusable whatever the model: a lone surrogate
  (undecodable bytes in a command-line argument), U+FFFD (text decoded with replacement) or CLIP's special
  token text (``<|endoftext|>`` ends the prompt where it stands).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from talk2dino.errors import InvalidInputError, one_line

__all__ = [
    "BACKGROUND_NAME",
    "SPECIAL_TOKEN_TEXTS",
    "canonical_label",
    "first_same_pair",
    "label_text_problem",
    "split_labels",
]

BACKGROUND_NAME = "background"
"""Name of the background class: the first channel a segmenter with ``background=True`` adds, a benchmark's
class 0, and the name the legends and JSONs show for it. A label with this canonical name is refused next to the
background class."""

SPECIAL_TOKEN_TEXTS = ("<|startoftext|>", "<|endoftext|>")
"""CLIP's special tokens: the tokenizer turns this text into the token itself, wherever it stands in a prompt."""

# The tokenizer's normaliser replaces the regex \s+ (Unicode White_Space) by one space; Python's \s on str is
# the same set of characters.
_WHITESPACE = re.compile(r"\s+")
_QUOTE = '"'
_NOT_TEXT = re.compile("[\ud800-\udfff\ufffd]")


def canonical_label(name: str) -> str:
    """The label as the CLIP text encoder sees it: NFC, whitespace runs collapsed to one space, trimmed, lower case.

    Lower case, not ``str.casefold``: CLIP lower-cases, and casefold would also merge labels CLIP tells apart
    (``straße``/``strasse``, ``ﬁsh``/``fish`` give different tokens). Lower-cased one character at a time, as
    the tokenizer's normaliser does: ``str.lower`` applies the Greek final-sigma rule (``ΣΑΣ`` -> ``σας``), which
    the tokenizer does not (``ΣΑΣ`` gives the tokens of ``σασ``).
    """
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", name)).strip()
    return "".join(ch.lower() for ch in text)


def first_same_pair(names: Sequence[str]) -> tuple[int, int] | None:
    """0-based indices ``(earlier, later)`` of the first two labels with the same :func:`canonical_label`, or None."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        key = canonical_label(name)
        if key in seen:
            return seen[key], index
        seen[key] = index
    return None


def label_text_problem(name: str) -> str | None:
    """Why `name` cannot be a label whatever the model (a short clause), or None when its text is fine.

    Control characters, emptiness and length are :meth:`Segmenter.check_labels`'s; this covers text that is
    not really text (a lone surrogate, U+FFFD) and CLIP's special token text.
    """
    bad = _NOT_TEXT.search(name)
    if bad is not None:
        if bad.group() == "\ufffd":
            return ("holds U+FFFD, the replacement character a decoder leaves for bytes that were not valid text; "
                    "send the label in UTF-8")
        # Python decodes command-line bytes that are not UTF-8 to lone surrogates (surrogateescape); the
        # tokenizer cannot encode them and failed deep inside with a TypeError.
        return (f"holds the lone surrogate U+{ord(bad.group()):04X}, left by bytes that are not UTF-8 (from a "
                "command line, for one); write the label in UTF-8")
    for special in SPECIAL_TOKEN_TEXTS:
        if special in name:
            return (f"holds {special}, CLIP's special token text: the text encoder would read it as the token "
                    "itself (the prompt ends or restarts there); remove it")
    return None


def split_labels(text: str, *, what: str = "--labels") -> list[str]:
    """Split a comma-separated label list; an entry may be double-quoted to hold commas, as in CSV.

    Unquoted entries are trimmed, and a ``"`` inside them is kept (``5" floppy``). A quoted entry starts with
    ``"`` (after blanks) and ends at the next lone ``"``; ``""`` inside it is one ``"``, and its text is kept
    verbatim. Only blanks may follow the closing quote before the next comma.

    Args:
        text: the list, e.g. ``'cat, "dining table, wooden", sofa'``.
        what: how the message names the source (``--labels``, ``labels``).

    Returns:
        The labels in order (not yet checked: :meth:`Segmenter.check_labels` does that).

    Raises:
        InvalidInputError: an empty entry (``cat,,dog``, ``""``), a quote that is never closed, or text after a
            closing quote; one line quoting the (escaped, shortened) list.
    """
    shown = one_line(repr(text))
    labels: list[str] = []
    empty: list[int] = []  # 1-based entries that came out empty, reported once the entry count is known
    pos, end = 0, len(text)
    while True:
        # Blanks before an entry (Python's isspace: the same set of characters as str.strip).
        while pos < end and text[pos].isspace():
            pos += 1
        if pos < end and text[pos] == _QUOTE:
            opened = pos
            parts: list[str] = []
            pos += 1
            while True:
                close = text.find(_QUOTE, pos)
                if close < 0:
                    raise InvalidInputError(
                        f"{what}: the quote at character {opened + 1} is never closed in {shown}; close it "
                        '("dining table, wooden") or write the label without quotes')
                parts.append(text[pos:close])
                if text.startswith(_QUOTE * 2, close):
                    parts.append(_QUOTE)
                    pos = close + 2
                    continue
                pos = close + 1
                break
            label = "".join(parts)
            comma = text.find(",", pos)
            stop = end if comma < 0 else comma
            if text[pos:stop].strip():
                raise InvalidInputError(
                    f"{what}: {one_line(repr(text[pos:stop].strip()), 40)} follows the quoted label "
                    f"{one_line(repr(label), 60)} in {shown}; put a comma after the closing quote, or write "
                    'a quote inside a quoted label as ""')
        else:
            comma = text.find(",", pos)
            stop = end if comma < 0 else comma
            label = text[pos:stop].strip()
        if not label:
            empty.append(len(labels) + 1)
        labels.append(label)
        if comma < 0:
            break
        pos = comma + 1
    if empty:
        raise InvalidInputError(f"{what} entry {empty[0]} of {len(labels)} is empty in {shown}")
    return labels

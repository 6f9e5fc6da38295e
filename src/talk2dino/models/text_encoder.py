"""CLIP ViT-B/16 text tower: prompts -> unnormalised 512-d embeddings (method.md §2.1)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Set by `collect_truncations`: the list the caller reports from, instead of the encoder's own warning.
_TRUNCATIONS: contextvars.ContextVar[list[tuple[str, int]] | None] = contextvars.ContextVar(
    "talk2dino_truncations", default=None)


@contextlib.contextmanager
def collect_truncations() -> Iterator[list[tuple[str, int]]]:
    """Collect ``(prompt, tokens)`` of every prompt truncated inside the block, instead of warning.

    The caller knows what the prompts are made of (a label in seven templates) and reports them in its own
    words, once per label (`Segmenter.class_embeddings`). Per thread and task (a context variable).
    """
    found: list[tuple[str, int]] = []
    token = _TRUNCATIONS.set(found)
    try:
        yield found
    finally:
        _TRUNCATIONS.reset(token)


class ClipTextEncoder(nn.Module):
    """A frozen transformers ``CLIPTextModelWithProjection`` plus its tokenizer.

    The embedding is CLIP's ``encode_text``: final LayerNorm, the token at the **first** end-of-text
    position, times the text projection; it is not normalised (method.md §2.1).
    """

    model: Any  # a transformers CLIPTextModelWithProjection; submodules are read by name
    tokenizer: Any  # a transformers CLIP tokenizer

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int) -> None:
        """Args:
            model: a transformers ``CLIPTextModelWithProjection``.
            tokenizer: its CLIP tokenizer (called with a list of strings).
            context_length: maximum tokens per prompt, start and end tokens included (77 for CLIP).
        """
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = context_length
        eot = getattr(tokenizer, "eos_token_id", None)
        if eot is None:
            raise ValueError("the CLIP tokenizer defines no end-of-text token")
        self.eot_id: int = int(eot)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = self.eot_id if pad is None else int(pad)
        self.embed_dim: int = int(model.config.projection_dim)

    def tokenize(self, prompts: Sequence[str], *, pad_to_context: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts, truncating (with a warning line each) any longer than the context.

        Inside `encode` or `collect_truncations` the cut prompts are collected instead and reported once.

        Padding after the end-of-text token cannot change its embedding (CLIP's text attention is
        causal), so the fast path pads to the longest prompt only.

        Args:
            prompts: N strings.
            pad_to_context: pad every row to `context_length` (the reference's layout).

        Returns:
            ``(input_ids [N, L] int64, attention_mask [N, L] int64)``.
        """
        rows, _ = self._tokenize(prompts)
        width = self.context_length if pad_to_context else max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask

    def _tokenize(self, prompts: Sequence[str]) -> tuple[list[list[int]], list[tuple[str, int]]]:
        """Token rows cut to the context, and ``(prompt, tokens)`` of each prompt that was cut."""
        # verbose=False: transformers' own "Token indices sequence length is longer than ..." warning would
        # repeat what `encode` reports, less precisely (the cut is ours, below).
        rows = self.tokenizer(list(prompts), verbose=False)["input_ids"]
        cut: list[tuple[str, int]] = []
        for i, row in enumerate(rows):
            if len(row) > self.context_length:
                # Keep the first tokens and end with the end-of-text token, as the reference's
                # clip.tokenize(truncate=True) does.
                cut.append((prompts[i], len(row)))
                rows[i] = [*row[:self.context_length - 1], self.eot_id]
        collector = _TRUNCATIONS.get()
        for prompt, tokens in cut:
            if collector is None:
                logger.warning("prompt truncated from %d to %d tokens: %.60r", tokens, self.context_length, prompt)
            else:
                logger.debug("prompt truncated from %d to %d tokens: %.60r", tokens, self.context_length, prompt)
                collector.append((prompt, tokens))
        return rows, cut

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token ids.

        Args:
            input_ids: ``[N, L]`` int64 CLIP token ids, each row holding an end-of-text token.
            attention_mask: ``[N, L]`` 1 for real tokens.

        Returns:
            ``[N, 512]`` float32 unnormalised text embeddings.
        """
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # First occurrence of the end-of-text id (the reference's "largest id" trick fails with
        # tokenizers that pad with that very id; method.md §2.1 step 3).
        eot_pos = (input_ids == self.eot_id).int().argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=device), eot_pos]
        return self.model.text_projection(pooled).float()

    def encode(self, prompts: Sequence[str], *, batch_size: int, pad_to_context: bool = False) -> torch.Tensor:
        """Embed prompts in batches.

        Prompts longer than the context are cut to it, as the reference does; that is one warning line for the
        whole call (unless a caller collects them with `collect_truncations` and reports them itself).

        Returns:
            ``[N, 512]`` float32 unnormalised embeddings, on the model's device.
        """
        chunks = []
        with collect_truncations() as cut:
            for start in range(0, len(prompts), batch_size):
                ids, mask = self.tokenize(prompts[start:start + batch_size], pad_to_context=pad_to_context)
                chunks.append(self.forward(ids, mask))
        outer = _TRUNCATIONS.get()
        if outer is not None:
            outer.extend(cut)
        elif cut:
            longest = max(cut, key=lambda item: item[1])
            logger.warning("%d prompt(s) longer than %d tokens were cut to it (the longest, %d tokens: %.60r)",
                           len(cut), self.context_length, longest[1], longest[0])
        if not chunks:
            return torch.zeros(0, self.embed_dim, device=next(self.model.parameters()).device)
        return torch.cat(chunks)

"""Batch the per-step items: right padding for training, left padding for generation."""
from __future__ import annotations

import torch

from fastrlhf.data.encoding import IGNORE_INDEX


def _check_pad(pad_token_id) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer has no pad token. Fix: load it with "
                         "fastrlhf.models.loading.load_tokenizer, or set tokenizer.pad_token "
                         "(e.g. to the EOS token) before building collators")
    return int(pad_token_id)


def pad_sequences(seqs: list, value: int, left: bool = False) -> torch.Tensor:
    """Stack 1-D id sequences (tensors or lists) of different lengths into [B, max_len], padded
    right (or left)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            out[i, width - len(s):] = torch.as_tensor(s)
        else:
            out[i, :len(s)] = torch.as_tensor(s)
    return out


def _mask(seqs: list[torch.Tensor], left: bool = False) -> torch.Tensor:
    return pad_sequences([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, left)


class SFTCollator:
    """Step 1: {"input_ids", "attention_mask", "labels"}, right-padded, labels padded with -100."""

    def __init__(self, pad_token_id: int):
        self.pad = _check_pad(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        ids = [it["input_ids"] for it in items]
        return {"input_ids": pad_sequences(ids, self.pad), "attention_mask": _mask(ids),
                "labels": pad_sequences([it["labels"] for it in items], IGNORE_INDEX)}


class PairCollator:
    """Step 2: {"input_ids": [2B, S], "attention_mask"}, the B chosen rows first, then the B rejected."""

    def __init__(self, pad_token_id: int):
        self.pad = _check_pad(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        ids = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        return {"input_ids": pad_sequences(ids, self.pad), "attention_mask": _mask(ids)}


class PromptCollator:
    """Step 3: {"input_ids", "attention_mask"} LEFT-padded for generation, plus "prompt": list[str]
    and "columns": {name: list of values} (the rows' other columns, None where a row lacks one)."""

    def __init__(self, pad_token_id: int):
        self.pad = _check_pad(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        ids = [it["prompt_input_ids"] for it in items]
        names = sorted({k for it in items for k in (it.get("columns") or {})})
        columns = {k: [(it.get("columns") or {}).get(k) for it in items] for k in names}
        out = {"input_ids": pad_sequences(ids, self.pad, left=True), "attention_mask": _mask(ids, left=True),
               "prompt": [it["prompt"] for it in items], "columns": columns}
        if any("prompt_messages" in it for it in items):  # multi-turn rollouts render these again
            out["prompt_messages"] = [it.get("prompt_messages") for it in items]
        return out

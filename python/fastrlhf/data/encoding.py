"""Tokenize Samples into the per-step items, applying the length limits."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from fastrlhf.data.formats import Sample

logger = logging.getLogger("fastrlhf.data")
IGNORE_INDEX = -100


class TokenizedDataset(Dataset):
    """Items of one step as lists of ints; ``stats`` counts what the length limits did."""

    def __init__(self, step: int, items: list[dict], stats: dict):
        self.step, self.items, self.stats = step, items, stats

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {k: v if isinstance(v, (str, dict)) or k == "prompt_messages" else torch.tensor(v, dtype=torch.long)
                for k, v in self.items[i].items()}


class StepTokenizer:
    """Encodes prompt and answer separately, so prompt masking is exact for any tokenizer."""

    def __init__(self, tokenizer, max_prompt_len: int, max_answer_len: int, overlong: str,
                 train_on_prompt: bool):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.bos_text = tokenizer.bos_token
        self.max_prompt_len, self.max_answer_len = max_prompt_len, max_answer_len
        self.truncate = overlong == "truncate"
        self.train_on_prompt = train_on_prompt

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        # A chat template that writes BOS itself must not get a second one from the tokenizer.
        with_bos = [not (self.bos_text and t.startswith(self.bos_text)) for t in texts]
        out: list = [None] * len(texts)
        for flag in (True, False):
            idx = [i for i, w in enumerate(with_bos) if w == flag]
            if idx:
                ids = self.tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
                for i, row in zip(idx, ids):
                    out[i] = list(row)
        return out

    def answer_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) + [self.eos] for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _fit_prompt(self, ids: list[int]) -> list[int]:
        """Left-truncate to the limit, keeping a leading BOS."""
        keep = self.max_prompt_len
        if ids and self.bos is not None and ids[0] == self.bos and keep > 1:
            return [ids[0]] + ids[len(ids) - keep + 1:]
        return ids[len(ids) - keep:]

    def _fit_answer(self, ids: list[int]) -> list[int]:
        return ids[: self.max_answer_len]   # cut from the right: the EOS goes, the answer did not end

    def encode(self, step: int, samples: list[Sample]) -> tuple[list[dict], dict]:
        stats = {"rows": len(samples), "kept": 0, "prompt_overlong": 0, "answer_overlong": 0,
                 "dropped": 0, "truncated": 0}
        items = []
        prompts = self.prompt_ids([s.prompt for s in samples])
        chosen = self.answer_ids([s.chosen for s in samples]) if step in (1, 2) else []
        rejected = self.answer_ids([s.rejected for s in samples]) if step == 2 else []
        for k, s in enumerate(samples):
            prompt = prompts[k]
            answers = [chosen[k]] if step == 1 else [chosen[k], rejected[k]] if step == 2 else []
            long_prompt = len(prompt) > self.max_prompt_len
            long_answer = any(len(a) > self.max_answer_len for a in answers)
            stats["prompt_overlong"] += long_prompt
            stats["answer_overlong"] += long_answer
            if long_prompt or long_answer:
                if not self.truncate:
                    stats["dropped"] += 1
                    continue
                stats["truncated"] += 1
                prompt = self._fit_prompt(prompt) if long_prompt else prompt
                answers = [self._fit_answer(a) for a in answers]
            items.append(self._item(step, s, prompt, answers))
        stats["kept"] = len(items)
        return items, stats

    def _item(self, step: int, sample: Sample, prompt: list[int], answers: list[list[int]]) -> dict:
        if step == 1:
            ids = prompt + answers[0]
            labels = list(ids) if self.train_on_prompt else [IGNORE_INDEX] * len(prompt) + answers[0]
            return {"input_ids": ids, "labels": labels}
        if step == 2:
            return {"chosen_input_ids": prompt + answers[0], "rejected_input_ids": prompt + answers[1]}
        item = {"prompt_input_ids": prompt, "prompt": sample.prompt, "columns": dict(sample.columns or {})}
        if sample.messages is not None:   # what multi-turn rollouts render again (fastrlhf.agents)
            item["prompt_messages"] = [dict(m) for m in sample.messages]
        return item


def log_stats(step: int, part: str, stats: dict, overlong: str) -> None:
    long_rows = stats["dropped"] + stats["truncated"]
    message = (f"step {step} {part}: {stats['kept']} of {stats['rows']} rows kept; "
               f"{stats['prompt_overlong']} prompts and {stats['answer_overlong']} answers over the "
               f"length limit, {long_rows} rows {'dropped' if overlong == 'drop' else 'truncated'}")
    (logger.warning if long_rows else logger.info)(message)

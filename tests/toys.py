"""Tiny models and toy datasets for the trainer tests (no hub, seconds on a CPU).

`make_tiny_model_dir(d)` writes a word-level tokenizer (no pad token, so loading adds one) and a
2-layer Llama config (GQA) to `d`: a config-only dir that `load_causal_lm` builds with a seed.
The toy tasks are trivially learnable, so a few optimizer steps show the trainers work:
  - `ToySFTDataset`: the answer is the prompt's first words shifted by a fixed offset;
  - `ToyPairDataset`: the chosen answer contains the word "good", the rejected one "bad".
Test modules import it as `toys` (tests/ is on their sys.path, as for conftest); run as a script
(`python tests/toys.py ...`, also under torchrun) it is a toy SFT run (`main`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from fastrlhf.data.collators import pad_sequences

WORDS = ["<unk>", "<s>", "</s>", "good", "bad"] + [f"w{i}" for i in range(40)]
EOS_ID = 2
GOOD_ID, BAD_ID = 3, 4
FIRST_WORD_ID = 5


def make_tiny_model_dir(path: str, *, hidden: int = 32, layers: int = 2, with_weights: bool = False,
                        seed: int = 0, tie_word_embeddings: bool = False) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    os.makedirs(path, exist_ok=True)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS_ID,
                         tie_word_embeddings=tie_word_embeddings)
    if with_weights:
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    return path


def _random_prompt(g: torch.Generator) -> torch.Tensor:
    n = int(torch.randint(2, 6, (1,), generator=g))
    return torch.randint(FIRST_WORD_ID, FIRST_WORD_ID + 20, (n,), generator=g)


class ToySFTDataset(torch.utils.data.Dataset):
    """Step-1 items {"input_ids", "labels"} (labels -100 on the prompt), EOS-terminated."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items: List[Dict[str, torch.Tensor]] = []
        for _ in range(n):
            prompt = _random_prompt(g)
            answer = prompt[:3] + 20
            ids = torch.cat([prompt, answer, torch.tensor([EOS_ID])])
            labels = ids.clone()
            labels[:len(prompt)] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.items[i]


class ToyPairDataset(torch.utils.data.Dataset):
    """Step-2 items {"chosen_input_ids", "rejected_input_ids"}: same prompt and filler, the chosen
    answer holds "good" where the rejected one holds "bad"."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            prompt = _random_prompt(g)
            filler = torch.randint(FIRST_WORD_ID, FIRST_WORD_ID + 40, (int(torch.randint(1, 4, (1,), generator=g)),),
                                   generator=g)
            pos = int(torch.randint(0, len(filler) + 1, (1,), generator=g))

            def answer(word: int) -> torch.Tensor:
                return torch.cat([prompt, filler[:pos], torch.tensor([word]), filler[pos:], torch.tensor([EOS_ID])])
            self.items.append({"chosen_input_ids": answer(GOOD_ID), "rejected_input_ids": answer(BAD_ID)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class ToySFTCollator:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items):
        ids = [x["input_ids"] for x in items]
        return {"input_ids": pad_sequences(ids, self.pad), "attention_mask": pad_sequences([torch.ones_like(i) for i in ids], 0),
                "labels": pad_sequences([x["labels"] for x in items], -100)}


class ToyPairCollator:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items):
        rows = [x["chosen_input_ids"] for x in items] + [x["rejected_input_ids"] for x in items]
        return {"input_ids": pad_sequences(rows, self.pad), "attention_mask": pad_sequences([torch.ones_like(r) for r in rows], 0)}


def tiny_train_kwargs(model_dir: str, output_dir: str, **over) -> Dict[str, object]:
    """Config values for a seconds-long run on the toy data."""
    kw = dict(model_name_or_path=model_dir, output_dir=output_dir, micro_batch_size=4, global_batch_size=8,
              learning_rate=3e-3, lr_scheduler="constant", warmup_ratio=0.0, log_steps=1, resume="no",
              eval_max_batches=None, cpu_threads=1)
    kw.update(over)
    return kw


def losses_from_metrics(output_dir: str, name: str = "train/loss") -> Dict[int, float]:
    """{step: value} of a scalar from a run's metrics.jsonl (written by rank 0)."""
    import json
    out: Dict[int, float] = {}
    path: Optional[str] = os.path.join(output_dir, "tensorboard", "metrics.jsonl")
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if name in row:
                out[int(row["step"])] = row[name]
    return out


def run_toy_sft(output_dir: str, model_dir: str, **over) -> Dict[int, float]:
    """Toy SFT through the real trainer; returns {step: loss} (the same on every rank)."""
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.rlhf.sft import train_sft
    tok = load_tokenizer(model_dir)
    cfg = SFTConfig(**tiny_train_kwargs(model_dir, output_dir, **over))
    result = train_sft(cfg, tokenizer=tok, datasets=(ToySFTDataset(64, seed=0), ToySFTDataset(16, seed=1)),
                       collate=ToySFTCollator(tok.pad_token_id))
    return result["losses"]


def main(argv=None) -> None:
    """`python tests/toys.py --model_dir D --output_dir O [--zero_stage 3 ...]`: a toy SFT run (under
    torchrun too) whose per-step losses are written to O/losses.json by rank 0."""
    import argparse
    import json
    from fastrlhf.utils.distributed import is_rank0
    p = argparse.ArgumentParser()
    p.add_argument("--model_dir", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--zero_stage", type=int, default=0)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=6)
    args = p.parse_args(argv)
    losses = run_toy_sft(args.output_dir, args.model_dir, zero_stage=args.zero_stage,
                         micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                         max_steps=args.max_steps, eval_max_batches=1)
    if is_rank0():
        with open(os.path.join(args.output_dir, "losses.json"), "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    main()

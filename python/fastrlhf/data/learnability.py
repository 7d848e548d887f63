"""Check that the default task is learnable by a tiny reward model on a CPU, in plain torch.

``python -m fastrlhf.data.learnability --seconds 120 --threads 2`` builds the default tiny
Llama from its config (random init, seeded), puts a linear head on the last real token and
trains it with the pairwise loss -log sigmoid(r_chosen - r_rejected) for a fixed wall-clock
budget, then prints the held-out pairwise accuracy. It uses no fastrlhf trainer code, so it
tells whether the *task* is learnable independently of the pipeline.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from fastrlhf.data.default_task import default_data_path, default_model_dir, prompt_tone


def _encode(tokenizer, prompt: str, answer: str) -> list[int]:
    rendered = f"Human: {prompt}\n\nAssistant:"
    return (tokenizer(rendered).input_ids + tokenizer(" " + answer, add_special_tokens=False).input_ids
            + [tokenizer.eos_token_id])


def _batch(seqs: list[list[int]], pad_id: int):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(width)[None] < lengths[:, None]).long(), lengths


class _LastTokenScorer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel
        self.backbone = AutoModel.from_config(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, ids, mask, lengths):
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(hidden[torch.arange(len(ids)), lengths - 1]).squeeze(-1)


def run(seconds: float, threads: int, batch_pairs: int, lr: float, eval_pairs: int, seed: int,
        only_tone: str | None = None, max_steps: int | None = None, data_path: str | None = None) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = AutoConfig.from_pretrained(default_model_dir())
    rows = [json.loads(line) for line in open(data_path or default_data_path(), encoding="utf-8")]
    if only_tone:
        rows = [r for r in rows if prompt_tone(r["prompt"]) == only_tone]
    random.Random(seed).shuffle(rows)
    pairs = [(_encode(tokenizer, r["prompt"], r["chosen"]), _encode(tokenizer, r["prompt"], r["rejected"]))
             for r in rows]
    eval_set, train_set = pairs[:eval_pairs], pairs[eval_pairs:]
    model = _LastTokenScorer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id

    def accuracy() -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(eval_set), 128):
                chunk = eval_set[i:i + 128]
                scores = model(*_batch([c for c, _ in chunk] + [r for _, r in chunk], pad))
                right += (scores[:len(chunk)] > scores[len(chunk):]).sum().item()
        model.train()
        return right / len(eval_set)

    start, step, history = time.time(), 0, []
    rng = random.Random(seed + 1)
    while time.time() - start < seconds and (max_steps is None or step < max_steps):
        chunk = rng.sample(train_set, batch_pairs)
        scores = model(*_batch([c for c, _ in chunk] + [r for _, r in chunk], pad))
        loss = -F.logsigmoid(scores[:batch_pairs] - scores[batch_pairs:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            history.append((step, round(time.time() - start, 1), round(loss.item(), 4), accuracy()))
            print(*history[-1], flush=True)
    return {"steps": step, "seconds": round(time.time() - start, 1), "eval_accuracy": accuracy(),
            "history": history, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-pairs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-pairs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-tone", choices=["happy", "sad"], default=None,
                        help="train and evaluate on one tone only (isolates the tone conditioning)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--data", default=None, help="a prompt/chosen/rejected .jsonl (default: bundled)")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.threads, args.batch_pairs, args.lr, args.eval_pairs, args.seed,
                 args.only_tone, args.max_steps, args.data)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))


if __name__ == "__main__":
    main()

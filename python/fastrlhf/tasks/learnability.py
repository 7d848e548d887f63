"""Check, in plain torch, that the default task is learnable by the tiny model on a CPU.

    python -m fastrlhf.tasks.learnability rm  --seconds 150 --threads 2
    python -m fastrlhf.tasks.learnability sft --seconds 150 --threads 2

``rm`` builds the default tiny Llama from its config (random init, seeded), puts a linear head
on the last real token and trains it with -log sigmoid(r_chosen - r_rejected) on the step-2
split for a wall-clock budget (or --max-steps), printing held-out pairwise accuracy as it goes.
``sft`` trains the causal LM on the step-1 split and prints the mean ground-truth score of
sampled answers to held-out step-3 prompts before and after, the baseline PPO has to beat.
Only fastrlhf.data is used (no trainer code), so this isolates the task from the pipeline.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

from fastrlhf.data import DataSpec, PairCollator, PromptCollator, SFTCollator, build_datasets
from fastrlhf.tasks.default_task import default_model_dir, ground_truth_score


class _LastTokenScorer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel
        self.backbone = AutoModel.from_config(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1          # right padding
        return self.head(hidden[torch.arange(len(input_ids)), last]).squeeze(-1)


def _setup(threads: int, seed: int, data: str | None):
    from transformers import AutoConfig, AutoTokenizer
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = AutoConfig.from_pretrained(default_model_dir())
    spec = DataSpec(paths=[data] if data else [], seed=seed)
    return tokenizer, config, spec


def _batches(dataset, collate, batch_size: int, rng: random.Random):
    while True:
        yield collate([dataset[i] for i in rng.sample(range(len(dataset)), batch_size)])


def train_rm(seconds: float, threads: int, batch_pairs: int, lr: float, seed: int,
             max_steps: int | None = None, data: str | None = None, log_every: int = 50) -> dict:
    tokenizer, config, spec = _setup(threads, seed, data)
    train, evals = build_datasets(spec, tokenizer, 2)
    collate = PairCollator(tokenizer.pad_token_id)
    model = _LastTokenScorer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        right = 0
        for i in range(0, len(evals), 100):
            chunk = [evals[k] for k in range(i, min(i + 100, len(evals)))]
            scores = model(**collate(chunk))
            right += (scores[:len(chunk)] > scores[len(chunk):]).sum().item()
        model.train()
        return right / len(evals)

    start, step, history = time.time(), 0, []
    for batch in _batches(train, collate, batch_pairs, random.Random(seed)):
        if time.time() - start >= seconds or (max_steps is not None and step >= max_steps):
            break
        scores = model(**batch)
        loss = -F.logsigmoid(scores[:batch_pairs] - scores[batch_pairs:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % log_every == 0:
            history.append({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4),
                            "eval_accuracy": accuracy()})
            print(json.dumps(history[-1]), flush=True)
    return {"steps": step, "seconds": round(time.time() - start, 1), "eval_accuracy": accuracy(),
            "eval_pairs": len(evals), "params": sum(p.numel() for p in model.parameters()), "history": history}


@torch.no_grad()
def _mean_ground_truth(model, tokenizer, prompts, n: int, max_new_tokens: int = 32) -> float:
    model.eval()
    batch = PromptCollator(tokenizer.pad_token_id)([prompts[i] for i in range(n)])
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return sum(ground_truth_score(p, a) for p, a in zip(batch["prompt"], answers)) / n


def train_sft(seconds: float, threads: int, batch_size: int, lr: float, seed: int,
              max_steps: int | None = None, data: str | None = None, eval_prompts: int = 200) -> dict:
    from transformers import AutoModelForCausalLM
    tokenizer, config, spec = _setup(threads, seed, data)
    train = build_datasets(spec, tokenizer, 1)[0]
    prompts = build_datasets(spec, tokenizer, 3)[1]
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    before = _mean_ground_truth(model, tokenizer, prompts, min(eval_prompts, len(prompts)))
    start, step = time.time(), 0
    for batch in _batches(train, SFTCollator(tokenizer.pad_token_id), batch_size, random.Random(seed)):
        if time.time() - start >= seconds or (max_steps is not None and step >= max_steps):
            break
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(json.dumps({"step": step, "seconds": round(time.time() - start, 1), "loss": round(loss.item(), 4)}),
                  flush=True)
    seconds_used = round(time.time() - start, 1)
    after = _mean_ground_truth(model, tokenizer, prompts, min(eval_prompts, len(prompts)))
    return {"steps": step, "seconds": seconds_used, "final_loss": round(loss.item(), 4),
            "ground_truth_before": round(before, 4), "ground_truth_after": round(after, 4)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["rm", "sft"])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="pairs (rm) or sequences (sft) per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="a prompt/chosen/rejected file (default: bundled)")
    args = parser.parse_args(argv)
    if args.what == "rm":
        result = train_rm(args.seconds, args.threads, args.batch, args.lr, args.seed, args.max_steps, args.data)
        result.pop("history")
    else:
        result = train_sft(args.seconds, args.threads, args.batch, args.lr, args.seed, args.max_steps, args.data)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

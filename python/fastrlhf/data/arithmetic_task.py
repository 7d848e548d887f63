"""The bundled arithmetic task: one-step word problems with an exact answer.

Every prompt is a short word problem, e.g. ``Mia has 12 apples . She gets 7 more . How many
apples does Mia have now ?``; the reference solution writes the equation and the final answer
after ``####`` (GSM8K's marker): ``12 + 7 = 19 . #### 19``. Each row of the shipped
``arithmetic/arithmetic_task.jsonl`` has

    prompt    the problem
    response  the worked solution (what SFT imitates; sometimes with a slip, see below)
    answer    the true final number as a string (the ground truth a reward function reads)

so ``--reward_fn fastrlhf.rewards:arithmetic_reward`` (1 when the answer after the last ``####``,
or else the last number, equals ``answer``) trains it with GRPO and no reward model. Problems
add (operands 1-15), subtract (2-25) or multiply (2-7); numbers are single tokens of a word-level
tokenizer, so the tiny model has to learn the facts. The data is imperfect on purpose, like real
SFT data: in ``SLIP_RATE`` (35%) of the worked solutions the equation is right but the final
answer after ``####`` is a slip (an operand copied, or a stray number), so SFT learns a sloppy
habit that only the exact reward can see, and the facts it half knows leave room to sharpen.

The folder holds the data, the word-level tokenizer (Human/Assistant chat template) and a tiny
Llama ``config.json``; no weights. Regenerate byte for byte with
``python -m fastrlhf.data.arithmetic_task --out DIR [--seed N --rows N]``.
`fastrlhf train --task arithmetic` runs SFT then GRPO on it and prints held-out pass@1/pass@k
before and after RL (`evaluate_pass_at_k`).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastrlhf.data import default_task as _dt

DEFAULT_SEED = 2027
DEFAULT_ROWS = 6000
DATA_FILE = "arithmetic_task.jsonl"
MAX_NUMBER = 100
REWARD_SPEC = "fastrlhf.rewards:arithmetic_reward"
# share of worked solutions whose final answer is a slip (the equation above it is right)
SLIP_RATE = 0.35

NAMES = ("Ann Ben Tom Mia Sam Eva Leo Zoe Max Ivy Dan Amy Joe Kim Ray Lily Noah Emma Jack Ruby").split()
SHE = {"Ann", "Mia", "Eva", "Zoe", "Ivy", "Amy", "Kim", "Lily", "Emma", "Ruby"}
ITEMS = ("apples pears coins stamps marbles books pencils cards shells stickers eggs cookies "
         "balloons flowers beads buttons candles cups plates toys").split()
ADD = (
    "{n} has {a} {item} . {p} gets {b} more . How many {item} does {n} have now ?",
    "{n} had {a} {item} and found {b} more . How many {item} does {n} have ?",
    "There are {a} {item} in a box and {b} {item} on the table . How many {item} are there in all ?",
    "{n} picked {a} {item} in the morning and {b} {item} in the evening . How many {item} did {n} pick ?",
)
SUB = (
    "{n} has {a} {item} and gives {b} to {m} . How many {item} does {n} have left ?",
    "{n} had {a} {item} and lost {b} of them . How many {item} are left ?",
    "There were {a} {item} in a shop . {b} {item} were sold . How many {item} remain ?",
)
MUL = (
    "{n} buys {a} bags with {b} {item} in each bag . How many {item} does {n} buy ?",
    "There are {a} rows of {b} {item} . How many {item} are there ?",
)


def arithmetic_model_dir() -> str:
    """Folder with the arithmetic tokenizer and tiny Llama config (load both by this path)."""
    return str(Path(__file__).resolve().parent / "arithmetic")


def arithmetic_data_path() -> str:
    return str(Path(arithmetic_model_dir()) / DATA_FILE)


def make_problem(rng: random.Random) -> Dict[str, str]:
    """One row: prompt, response (worked solution) and answer."""
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    op = rng.choices(("+", "-", "*"), weights=(4, 3, 2))[0]
    if op == "+":
        a, b = rng.randint(1, 15), rng.randint(1, 15)
        c, template = a + b, rng.choice(ADD)
    elif op == "-":
        a = rng.randint(2, 25)
        b = rng.randint(1, a - 1)
        c, template = a - b, rng.choice(SUB)
    else:
        a, b = rng.randint(2, 7), rng.randint(2, 7)
        c, template = a * b, rng.choice(MUL)
    prompt = template.format(n=n, m=m, a=a, b=b, item=item, p="She" if n in SHE else "He")
    final = c
    if rng.random() < SLIP_RATE:   # a careless final answer: an operand copied, or a stray number
        final = rng.choice([x for x in (a, b, rng.randint(0, 60)) if x != c] or [c + 1])
    return {"prompt": prompt, "response": f"{a} {op} {b} = {c} . #### {final}", "answer": str(c)}


def generate_rows(seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(rows)]


def vocabulary() -> List[str]:
    words = {w.lower() for t in ADD + SUB + MUL for w in t.replace("{", " {").split() if not w.startswith("{")}
    words |= {w.lower() for w in NAMES} | set(ITEMS) | {"she", "he"}
    words |= {str(i) for i in range(MAX_NUMBER + 1)}
    words |= {"+", "-", "*", "=", "####", ".", "?", ",", "!", ":", "'", "human", "assistant", "system", "user"}
    return sorted(words)


def build_tokenizer():
    """Word-level fast tokenizer over the task's words and the numbers 0-100 (one token each)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [_dt.SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_dt.SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # tokens joined by single spaces ("####" must not read as a WordPiece continuation prefix)
    tok.decoder = decoders.WordPiece(prefix="\u2063", cleanup=False)
    bos = _dt.SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, chat_template=_dt.CHAT_TEMPLATE,
                                   padding_side="right", clean_up_tokenization_spaces=False,
                                   **_dt.SPECIAL_TOKENS)


def build_model_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """Tiny Llama (~0.8M parameters): 4 layers of width 128, GQA, tied embeddings."""
    config = _dt.build_model_config(vocab_size, pad_id, bos_id, eos_id)
    config.max_position_embeddings = 128
    return config


def write_arithmetic_task(out_dir: str, seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "w", encoding="utf-8") as f:
        for row in generate_rows(seed, rows):
            f.write(json.dumps(row) + "\n")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=_dt.CHAT_TEMPLATE)
    config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(_dt.CHAT_TEMPLATE, encoding="utf-8")
    build_model_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                       tokenizer.eos_token_id).save_pretrained(str(out))


# ----------------------------------------------------------------------------- pass@k evaluation

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_pass_at_k(model_dir: str, items: List[Dict[str, Any]], k: int = 8, *, temperature: float = 1.0,
                       max_new_tokens: int = 16, batch_prompts: int = 32, seed: int = 0,
                       tokenizer=None) -> Dict[str, float]:
    """Sample k answers (temperature, seeded) to each held-out prompt item (step-3 items with
    an `answer` column) with the hybrid engine; score them with the task's exact scorer.
    Returns {"pass@1", f"pass@{k}", "greedy", "prompts"}."""
    import torch
    from fastrlhf.data import PromptCollator
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.rewards import arithmetic_reward

    tokenizer = tokenizer or load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, tokenizer=tokenizer).eval()
    engine = HybridEngine(model, tokenizer, EngineConfig())
    collate = PromptCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    p1 = pk = greedy = 0.0
    for start in range(0, len(items), batch_prompts):
        chunk = items[start:start + batch_prompts]
        batch = collate([it for it in chunk for _ in range(k)])
        answers = [it["columns"]["answer"] for it in chunk]
        for do_sample in (True, False):
            ids, mask = (batch["input_ids"], batch["attention_mask"]) if do_sample else (
                batch["input_ids"][::k], batch["attention_mask"][::k])
            out = engine.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, generator=generator)
            texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
            reps = k if do_sample else 1
            right = arithmetic_reward([""] * len(texts), texts, answer=[a for a in answers for _ in range(reps)])
            if not do_sample:
                greedy += sum(right)
                continue
            for i in range(len(chunk)):
                c = int(sum(right[i * k:(i + 1) * k]))
                p1 += c / k
                pk += pass_at_k(k, c, k)
    n = max(len(items), 1)
    return {"pass@1": p1 / n, f"pass@{k}": pk / n, "greedy": greedy / n, "prompts": float(len(items))}


def heldout_items(tokenizer, data_spec=None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The step-3 held-out prompt items of the task (with their `answer` column)."""
    from fastrlhf.data import DataSpec, build_datasets
    spec = data_spec or DataSpec(paths=[arithmetic_data_path()], split_ratios="5,0,5")
    eval_ds = build_datasets(spec, tokenizer, 3)[1]
    n = len(eval_ds) if limit is None else min(limit, len(eval_ds))
    return [eval_ds[i] for i in range(n)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled arithmetic task.")
    parser.add_argument("--out", default=arithmetic_model_dir(), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = parser.parse_args(argv)
    write_arithmetic_task(args.out, args.seed, args.rows)
    print(f"wrote the arithmetic task ({args.rows} rows, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()

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

Held-out problems are never training problems: the rows `fastrlhf.data` holds out for eval (of
every step, under the task's split and the default data seed) are drawn first, as distinct
problems, and every other row is drawn without them (the same question never appears twice in
the file as held-out and training row; `generate_problems`).

The folder holds the data, the word-level tokenizer (Human/Assistant chat template) and a tiny
Llama ``config.json``; no weights. Regenerate byte for byte with
``python -m fastrlhf.tasks.arithmetic_task --out DIR [--seed N --rows N]``.
`fastrlhf train --task arithmetic` runs SFT then GRPO on it (`PROFILES`) and prints held-out
pass@1/pass@k before and after RL (`fastrlhf.tasks.evaluation.evaluate_pass_at_k`).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

from fastrlhf.tasks import default_task as _dt

DEFAULT_SEED = 2027
DEFAULT_ROWS = 6000
DATA_FILE = "arithmetic_task.jsonl"
SPLIT_RATIOS = "5,0,5"   # half for SFT, half for RL: there is no reward-model step
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


# `fastrlhf train --task arithmetic`: SFT, then GRPO with the
# exact-answer reward function and no reward model. Tuned on the shared 2-core VM (2026-11-27):
# lr 1e-3 (no warmup) blows the policy up on the first Adam step (approx KL > 4), lr 1e-4..3e-4
# without warmup stays flat for 25+ steps; 2e-4 with 20 warmup steps and 4 updates per step
# removes most final-answer slips within 100 steps (held-out pass@1 0.22 -> 0.38, README).
# kl_coef 0.1 (GRPO's k3 loss term): with 0 the equations drifted more (greedy accuracy fell).
PROFILES: Dict[str, Dict[str, Any]] = {
    "sft": {"cpu_threads": 1, "learning_rate": 3e-3, "micro_batch_size": 32, "num_epochs": 4, "warmup_ratio": 0.05,
            "weight_decay": 0.01, "eval_max_batches": 4, "log_steps": 10},
    "ppo": {"algo": "grpo", "group_size": 8, "rollout_batch_size": 16, "micro_batch_size": 32, "ppo_epochs": 1,
            "learning_rate": 2e-4, "warmup_steps": 20, "kl_coef": 0.1, "reward_clip": 0.0, "max_new_tokens": 12,
            "temperature": 1.0, "max_steps": 100, "reward_fn": ["fastrlhf.rewards:arithmetic_reward"],
            "eval_prompts": 64, "weight_decay": 0.0, "save_steps": 50, "log_steps": 1, "cpu_threads": 1},
}


def shared_values() -> Dict[str, Any]:
    """What every step of `fastrlhf train --task arithmetic` uses: the task's model, its data (half
    for SFT, half for RL: there is no reward-model step) and its lengths."""
    return {"model_name_or_path": arithmetic_model_dir(),
            "data": {"paths": [arithmetic_data_path()], "split_ratios": SPLIT_RATIOS, "max_prompt_len": 48,
                     "max_answer_len": 16}}


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


def heldout_positions(rows: int, split_ratios: Optional[str]) -> Set[int]:
    """The rows of a `rows`-row file that `fastrlhf.data` holds out for eval, of any step, when it
    splits the file by `split_ratios` under the default data seed and eval fraction."""
    from fastrlhf.data.build import eval_row_indices
    from fastrlhf.data.spec import DataSpec
    spec = DataSpec(split_ratios=split_ratios)
    return {i for step in (1, 2, 3) for i in eval_row_indices(rows, spec, step)}


def _draw(rng: random.Random, excluded: Set[str]) -> Dict[str, str]:
    """A problem whose question is not in `excluded` (redrawn until it is not)."""
    while True:
        row = make_problem(rng)
        if row["prompt"] not in excluded:
            return row


def generate_problems(seed: int, rows: int, heldout: Iterable[int]) -> List[Dict[str, str]]:
    """`rows` problems, the ones at the `heldout` positions drawn first and distinct, every other one
    drawn without them: a held-out question (the problem, whatever its worked solution) is at no
    other position. Deterministic in the seed."""
    rng = random.Random(seed)
    held: Dict[int, Dict[str, str]] = {}
    held_questions: Set[str] = set()
    for i in sorted(heldout):
        held[i] = _draw(rng, held_questions)
        held_questions.add(held[i]["prompt"])
    return [held[i] if i in held else _draw(rng, held_questions) for i in range(rows)]


def generate_rows(seed: int = DEFAULT_SEED, rows: int = DEFAULT_ROWS) -> List[Dict[str, str]]:
    """The task's file: no problem `fastrlhf train --task arithmetic` holds out is a training row."""
    return generate_problems(seed, rows, heldout_positions(rows, SPLIT_RATIOS))


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
    _dt.save_tokenizer(tokenizer, out, _dt.CHAT_TEMPLATE)
    build_model_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                       tokenizer.eos_token_id).save_pretrained(str(out))


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

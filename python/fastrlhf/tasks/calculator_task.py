"""The bundled calculator task: the arithmetic task's word problems, solved with a calculator tool
over two turns.

The model first calls the tool (Hermes/Qwen format), reads its answer, then writes the final
number after ``####``::

    Tools: calculator

    Human: Mia has 12 apples . She gets 7 more . How many apples does Mia have now ?

    Assistant: <tool_call> {"name": "calculator", "arguments": {"expression": " 12 + 7 " }} </tool_call></s>

    <tool_response> 19 </tool_response>

    Assistant: #### 19</s>

The problems come from `arithmetic_task`'s generator (same seed and row count, so held-out accuracy
compares with `--task arithmetic`): the first half are SFT demonstrations, the second half RL
prompts. The problems held out for evaluation (the RL prompts pass@k is measured on, and the
demonstrations with a row in SFT's eval share) are drawn first and are in no other demonstration
and no other RL row (`generate_problems`), so the rows differ from the arithmetic file's, whose own
held-out rows sit elsewhere. (An SFT eval row's twin, the other turn of the same demonstration, may
be a training row.) ``calculator/calculator_sft.jsonl`` has two SFT rows per demonstration (the tool
call after the question; the final answer after the tool's answer), their prompts rendered with
the tokenizer's chat template exactly as the tool environment renders them (``tools=`` naming the
calculator, the tool turn in ``<tool_response>``). ``SLIP_RATE`` of the demonstrations carry a
slip, so RL has something to fix: half of them an operand miscopied into the expression (the tool
then answers the wrong sum, and the demonstration copies it), half a final answer that is not the
tool's. ``calculator/calculator_rl.jsonl`` has the RL prompts with their ``answer`` column.

The tokenizer is word-level (the arithmetic words and numbers, one token each) plus the tool
call's pieces as single tokens (``<tool_call>``, ``{"name":``, ``"calculator",``,
``"arguments":``, ``{"expression":``, ``"``, ``}}``, ``</tool_call>``, ...); tokens decode joined by
single spaces, so a call decodes to valid JSON. Regenerate byte for byte with
``python -m fastrlhf.tasks.calculator_task --out DIR``. `fastrlhf train --task calculator` runs
SFT then GRPO with ``--tools fastrlhf.agents:calculator`` and the exact reward
``fastrlhf.rewards:calculator_reward`` (a ``####`` answer is required: the tool's own answer does
not count), and prints held-out pass@1/pass@8/greedy before and after RL.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Dict, List

from fastrlhf.tasks import arithmetic_task as _at
from fastrlhf.tasks import default_task as _dt

SFT_FILE, RL_FILE = "calculator_sft.jsonl", "calculator_rl.jsonl"
TOOL_SPEC = "fastrlhf.agents:calculator"
REWARD_SPEC = "fastrlhf.rewards:calculator_reward"
SLIP_RATE = 0.3
# the tool-call pieces that are single tokens (matched before the word splitting)
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", '{"name":', '"calculator",',
               '"arguments":', '{"expression":', "}}"]
CHAT_TEMPLATE = (
    "{% if tools %}Tools:{% for tool in tools %} {{ tool['function']['name'] }}{% endfor %}\n\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Human: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n\n"
    "{% elif message['role'] == 'tool' %}<tool_response> {{ message['content'] }} </tool_response>\n\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# what the chat template reads of the tool's schema (its name); the tool environment passes the
# full schema (fastrlhf.agents.tools.tool_schema), which renders the same
TOOLS = [{"type": "function", "function": {"name": "calculator"}}]


def calculator_model_dir() -> str:
    """Folder with the calculator tokenizer and tiny Llama config (load both by this path)."""
    return str(Path(__file__).resolve().parent / "calculator")


def calculator_data_paths() -> Dict[str, str]:
    return {"sft": str(Path(calculator_model_dir()) / SFT_FILE), "rl": str(Path(calculator_model_dir()) / RL_FILE)}


def tool_call_text(expression: str) -> str:
    """A calculator call as the model writes it (the tokens' decoding: single spaces between)."""
    return f'<tool_call> {{"name": "calculator", "arguments": {{"expression": " {expression} " }}}} </tool_call>'


def _equation(row: Dict[str, str]):
    """(a, op, b, c) of an arithmetic row's worked solution "a op b = c . #### final"."""
    a, op, b, _, c = row["response"].split()[:5]
    return int(a), op, int(b), int(c)


def _evaluate(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def demonstration(row: Dict[str, str], rng: random.Random) -> Dict[str, str]:
    """One problem's demonstration: the tool call, the tool's answer and the final answer;
    sometimes with a slip (see the module docstring)."""
    a, op, b, c = _equation(row)
    slip = rng.random() < SLIP_RATE
    in_expression = slip and rng.random() < 0.5
    if in_expression:   # an operand miscopied: the tool answers the wrong expression, faithfully copied
        wrong = rng.choice([x for x in (a - 1, a + 1, b, rng.randint(1, 15)) if x != a and x > 0] or [a + 1])
        a_used, b_used = wrong, b
    else:
        a_used, b_used = a, b
    result = _evaluate(a_used, op, b_used)
    final = result
    if slip and not in_expression:   # the tool's answer miscopied
        final = rng.choice([x for x in (a, b, result + 1, result - 1, rng.randint(0, 60)) if x != result])
    return {"call": tool_call_text(f"{a_used} {op} {b_used}"), "result": str(result), "final": f"#### {final}"}


def sft_rows(tokenizer, problems: List[Dict[str, str]], seed: int) -> List[Dict[str, str]]:
    """Two SFT rows per problem: (question -> tool call) and (question, call, tool answer -> final
    answer), their prompts rendered by the chat template with the tools, as the tool environment
    renders them."""
    import jinja2
    # the chat template as transformers runs it (trim_blocks, lstrip_blocks), compiled once: 6,000
    # apply_chat_template calls would take most of the generator's time
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)

    def render(messages):
        return template.render(messages=messages, tools=TOOLS, add_generation_prompt=True,
                               eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
    rng = random.Random(seed + 1)
    rows = []
    for problem in problems:
        demo = demonstration(problem, rng)
        user = [{"role": "user", "content": problem["prompt"]}]
        first = render(user)
        second = render(user + [{"role": "assistant", "content": demo["call"]}, {"role": "tool", "content": demo["result"]}])
        rows.append({"prompt": first, "response": demo["call"]})
        rows.append({"prompt": second, "response": demo["final"]})
    return rows


def vocabulary() -> List[str]:
    return sorted(set(_at.vocabulary()) | {"tools", "calculator", '"'})


def build_tokenizer():
    """Word-level fast tokenizer: the arithmetic words and 0-100, the tool-call pieces as tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [_dt.SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    vocab = {tok: i for i, tok in enumerate(specials + TOOL_TOKENS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_dt.SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="\u2063", cleanup=False)   # tokens joined by single spaces
    bos = _dt.SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, chat_template=CHAT_TEMPLATE,
                                   padding_side="right", clean_up_tokenization_spaces=False, **_dt.SPECIAL_TOKENS)


# `fastrlhf train --task calculator`: SFT on the demonstrations, then GRPO with the calculator tool
# and the exact reward. Tuned on the shared 2-core VM (2026-12-02; README "The calculator task").
PROFILES: Dict[str, Dict[str, Any]] = {
    "sft": {"cpu_threads": 1, "learning_rate": 3e-3, "micro_batch_size": 32, "num_epochs": 2, "warmup_ratio": 0.05,
            "weight_decay": 0.01, "eval_max_batches": 4, "log_steps": 10,
            "data": {"paths": [calculator_data_paths()["sft"]]}},
    "ppo": {"algo": "grpo", "group_size": 8, "rollout_batch_size": 8, "micro_batch_size": 32, "ppo_epochs": 1,
            "learning_rate": 2e-4, "warmup_steps": 10, "kl_coef": 0.05, "reward_clip": 0.0, "max_new_tokens": 16,
            "temperature": 1.0, "max_steps": 60, "tools": [TOOL_SPEC], "reward_fn": [REWARD_SPEC], "max_turns": 3,
            "max_observation_tokens": 16, "eval_prompts": 32, "weight_decay": 0.0, "save_steps": 50, "log_steps": 1,
            "cpu_threads": 1, "data": {"paths": [calculator_data_paths()["rl"]]}},
}


def shared_values() -> Dict[str, Any]:
    """What every step uses: the task's model and lengths (each step reads its own file whole: SFT
    the demonstrations, RL the prompts; see PROFILES)."""
    return {"model_name_or_path": calculator_model_dir(),
            "data": {"split_ratios": None, "max_prompt_len": 72, "max_answer_len": 20}}


def generate_problems(seed: int = _at.DEFAULT_SEED, rows: int = _at.DEFAULT_ROWS) -> List[Dict[str, str]]:
    """The task's problems: the first half SFT demonstrations (two SFT rows each), the second half RL
    prompts. Both files are read whole (no split_ratios); the problems of their held-out rows (the RL
    file's eval prompts, the demonstrations with an SFT eval row) are distinct and in no other
    demonstration and no other RL row."""
    half = rows // 2
    heldout = {half + i for i in _at.heldout_positions(rows - half, None)}
    heldout |= {r // 2 for r in _at.heldout_positions(2 * half, None)}   # SFT row r is demonstration r // 2
    return _at.generate_problems(seed, rows, heldout)


def write_calculator_task(out_dir: str, seed: int = _at.DEFAULT_SEED, rows: int = _at.DEFAULT_ROWS) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate_problems(seed, rows)
    half = len(problems) // 2
    tokenizer = build_tokenizer()
    with open(out / SFT_FILE, "w", encoding="utf-8") as f:
        for row in sft_rows(tokenizer, problems[:half], seed):
            f.write(json.dumps(row) + "\n")
    with open(out / RL_FILE, "w", encoding="utf-8") as f:
        for row in problems[half:]:
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"]}) + "\n")
    _dt.save_tokenizer(tokenizer, out, CHAT_TEMPLATE)
    _at.build_model_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                           tokenizer.eos_token_id).save_pretrained(str(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled calculator task.")
    parser.add_argument("--out", default=calculator_model_dir(), help="output folder")
    parser.add_argument("--seed", type=int, default=_at.DEFAULT_SEED)
    parser.add_argument("--rows", type=int, default=_at.DEFAULT_ROWS)
    args = parser.parse_args(argv)
    write_calculator_task(args.out, args.seed, args.rows)
    print(f"wrote the calculator task ({args.rows} problems, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()

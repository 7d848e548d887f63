"""The bundled arithmetic and calculator data hold no held-out problem in any training row: the
rows `fastrlhf.data` holds out for eval (taken through the data pipeline itself, as `fastrlhf
train --task NAME` splits the shipped files) ask questions that no training row of any step asks,
so pass@k is measured on unseen problems only."""
import json

import pytest

from fastrlhf.data.build import _step_samples
from fastrlhf.data.formats import PromptRenderer
from fastrlhf.data.spec import DataSpec
from fastrlhf.models.loading import load_tokenizer
from fastrlhf.tasks import arithmetic_task as at
from fastrlhf.tasks import calculator_task as ct


def question(rendered: str) -> str:
    """The word problem of a rendered prompt (the user turn: "Human: ...")."""
    return rendered.split("Human: ", 1)[1].split("\n", 1)[0].strip()


def split_questions(spec: DataSpec, model_dir: str, steps):
    """(held-out, training) questions of the steps' eval and train rows, as the pipeline splits them."""
    renderer = PromptRenderer(load_tokenizer(model_dir))
    held, trained = [], set()
    for step in steps:
        train, evals = _step_samples(spec, renderer, step, spec.paths)
        held += [question(s.prompt) for s in evals]
        trained |= {question(s.prompt) for s in train}
    return held, trained


def arithmetic_overlap(data_path: str):
    spec = DataSpec(**{**at.shared_values()["data"], "paths": [data_path]})
    held, trained = split_questions(spec, at.arithmetic_model_dir(), steps=(1, 3))
    return held, set(held) & trained


def calculator_overlap(sft_path: str, rl_path: str):
    """(held-out RL prompts, those in a training row), (SFT-held-out problems, those in another
    demonstration or an RL row: an SFT row's twin, the other turn of its demonstration, may train)."""
    data = ct.shared_values()["data"]
    held, trained = split_questions(DataSpec(**{**data, "paths": [rl_path]}), ct.calculator_model_dir(), steps=(3,))
    sft_held, _ = split_questions(DataSpec(**{**data, "paths": [sft_path]}), ct.calculator_model_dir(), steps=(1,))
    demos = [question(json.loads(line)["prompt"]) for line in open(sft_path, encoding="utf-8")][0::2]
    rl_held = set(held)
    sft_leaks = {q for q in sft_held if demos.count(q) != 1 or q in trained or q in rl_held}
    return held, set(held) & (trained | set(demos)), sft_held, sft_leaks


def test_arithmetic_heldout_problems_are_in_no_training_row():
    held, overlap = arithmetic_overlap(at.arithmetic_data_path())
    assert len(held) == 300 and len(set(held)) == len(held)   # SFT's and RL's 150 each, all distinct
    assert not overlap, sorted(overlap)[:5]


def test_calculator_heldout_prompts_are_in_no_demonstration_and_no_rl_training_row():
    paths = ct.calculator_data_paths()
    held, overlap, sft_held, sft_leaks = calculator_overlap(paths["sft"], paths["rl"])
    assert len(held) == 150 and len(set(held)) == len(held) and len(sft_held) == 300
    assert not overlap, sorted(overlap)[:5]
    assert not sft_leaks, sorted(sft_leaks)[:5]


@pytest.mark.parametrize("split_ratios", [at.SPLIT_RATIOS, None])
def test_the_generator_keeps_heldout_positions_out_of_the_other_rows(split_ratios):
    heldout = at.heldout_positions(400, split_ratios)
    rows = at.generate_problems(5, 400, heldout)
    held = [rows[i]["prompt"] for i in sorted(heldout)]
    assert len(held) == len(set(held)) > 0
    assert not set(held) & {r["prompt"] for i, r in enumerate(rows) if i not in heldout}
    assert rows == at.generate_problems(5, 400, heldout)   # deterministic in the seed

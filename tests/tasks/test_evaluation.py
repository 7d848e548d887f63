"""The bundled tasks' held-out evaluation (pass@k) and their records in `tasks.registry`."""
import os

import pytest

from fastrlhf.tasks.evaluation import evaluate_pass_at_k, heldout_items, pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2): both draws wrong in 1 of 6
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: one right answer among them is enough


def test_pass_at_k_of_the_arithmetic_task_on_its_tiny_model(one_thread):
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.tasks.arithmetic_task import arithmetic_model_dir
    model_dir = arithmetic_model_dir()  # a config only: random weights, seeded
    tok = load_tokenizer(model_dir, padding_side="left")
    items = heldout_items(tok, limit=3)
    assert len(items) == 3 and all("answer" in it["columns"] for it in items)
    res = evaluate_pass_at_k(model_dir, items, k=2, max_new_tokens=4, seed=0, tokenizer=tok)
    assert res["prompts"] == 3.0 and 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0 and 0.0 <= res["greedy"] <= 1.0
    again = evaluate_pass_at_k(model_dir, items, k=2, max_new_tokens=4, seed=0, tokenizer=tok)
    assert again == res  # seeded


def test_every_bundled_task_names_its_steps_profiles_and_data():
    from fastrlhf.rlhf.pipeline import STEP_NAMES
    from fastrlhf.tasks.registry import TASKS
    assert list(TASKS)[0] == "default" and TASKS["default"].shared() == {}
    for task in TASKS.values():
        assert set(task.steps) <= set(STEP_NAMES) and set(task.profiles) <= {STEP_NAMES[s] for s in task.steps}
        assert (task.evaluate is None) == (task.summary is None)
        shared = task.shared()
        for path in shared.get("data", {}).get("paths", []):
            assert os.path.getsize(path) > 0, path
        if shared.get("model_name_or_path"):
            assert os.path.isfile(os.path.join(shared["model_name_or_path"], "config.json"))

"""The agent options on the command line (`fastrlhf grpo --env/--tools`, `fastrlhf train
--ppo.env`): a missing module, file, class or method, a bad tool, --env with --tools, --max_turns
0 are refused in one line before any model loads; an environment that raises, hangs or answers a
malformed Step stops the run in one line naming the class, the problem and the prompt, before the
step's update (nothing saved as if trained)."""
import os

import pytest

from agent_models import guess  # noqa: F401  (a fixture)
from conftest import run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS = os.path.join(HERE, "envs.py")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test (patched where step 1 and step 3 call it, and at its source)."""
    import fastrlhf.models.loading as loading
    import fastrlhf.rlhf.ppo_models as ppo_models
    import fastrlhf.rlhf.sft as sft

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")
    for module in (loading, ppo_models, sft):
        monkeypatch.setattr(module, "load_causal_lm", no_loading)


@pytest.mark.parametrize("argv, message", [
    (["grpo", "--env", "no_such_env_module:Env"], r"--env .*no module named 'no_such_env_module'"),
    (["grpo", "--env", "missing_env.py:Env"], r"--env 'missing_env.py:Env': the file .*missing_env.py does not exist"),
    (["rloo", "--env", f"{ENVS}:NotThere"], r"envs.py has no class 'NotThere'"),
    (["ppo", "--env", f"{ENVS}:Misspelled"], r"the class Misspelled has no method step\(\) \(it has 'stepp': misspelled"),
    (["grpo", "--tools", f"{ENVS}:no_hints", "--reward_fn", f"{ENVS}:length_reward"], r"no_hints.*type hint"),
    (["grpo", "--tools", f"{ENVS}:no_doc", "--reward_fn", f"{ENVS}:length_reward"], r"no_doc.*docstring"),
    (["grpo", "--tools", f"{ENVS}:add", f"{HERE}/other/dup.py:add", "--reward_fn", f"{ENVS}:length_reward"],
     r"two tools are named 'add'"),
    (["grpo", "--env", f"{ENVS}:Echo", "--tools", f"{ENVS}:add"], r"--env and --tools together"),
    (["grpo", "--env", f"{ENVS}:Echo", "--max_turns", "0"], r"max_turns"),
    (["train", "--ppo.env", "missing_env.py:Env"], r"step 3 \(ppo\): --env 'missing_env.py:Env': the file"),
    (["train", "--ppo.env", f"{ENVS}:Misspelled"], r"step 3 \(ppo\): .*'stepp': misspelled"),
])
def test_bad_agent_options_are_one_line_before_any_model_loads(argv, message, tmp_path, capsys, no_model_loads):
    import re
    rc, _, err = run_cli(argv + ["--output_dir", str(tmp_path / "out")], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, problem", [
    ("Raises", r"environment Raises raised KeyError: 'no such move' \(at envs.py:\d+\) in step\(\)"),
    ("Hangs", r"environment Hangs did not return from step\(\) within --env_timeout 1s"),
    ("IntObservation", r"environment IntObservation step\(\) returned a non-string observation \(int 5\)"),
])
def test_an_environment_that_fails_stops_the_run_in_one_line(guess, env, problem, tmp_path, capsys):
    import re
    out = tmp_path / "run"
    rc, _, err = run_cli(["grpo", "--model_name_or_path", guess["sft"], "--data.paths", guess["data"],
                          "--data.split_ratios", "0,0,1", "--env", f"{ENVS}:{env}", "--env_timeout", "1",
                          "--group_size", "2", "--rollout_batch_size", "2", "--micro_batch_size", "4",
                          "--max_new_tokens", "3", "--max_turns", "2", "--max_steps", "1", "--eval_prompts", "0",
                          "--kl_coef", "0", "--output_dir", str(out)], capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("fastrlhf grpo: error: ") and re.search(problem, line), line
    assert "Human: guess my number" in line   # the prompt it failed on
    assert not (out / "actor").exists()        # stopped before the update: nothing saved as trained

"""The bundled tasks print the README's numbers on any x86 machine of the kind they were measured
on: their runs pin the CPU kernels' vector instructions to AVX2 (AVX-512 rounds differently, and RL
sampling amplifies it). Only for the bundled tasks whose README numbers were measured
pinned (pipeline.PINNED_TASKS), on their bundled models, never over the user's
setting, and the environment is as it was once the command returns."""
import os
import platform
import subprocess
import sys

import pytest

from fastrlhf import cli
from fastrlhf.rlhf import pipeline

KEYS = pipeline.REPRODUCIBLE_CPU_NUMERICS


@pytest.fixture
def seen(monkeypatch):
    """The pinned variables as the run saw them (the runs themselves are replaced: no training here)."""
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    got = []
    monkeypatch.setattr(pipeline, "run_trainer", lambda command, cfg: got.append({k: os.environ.get(k) for k in KEYS})
                        or "done")
    monkeypatch.setattr(pipeline, "run_steps", lambda configs, task: got.append({k: os.environ.get(k) for k in KEYS})
                        or ["done"])
    monkeypatch.setattr(pipeline, "check_step_inputs", lambda configs: None)
    return got


@pytest.mark.parametrize("argv, pinned", [
    (["sft"], True), (["train"], True), (["train", "--steps", "3"], True),
    (["sft", "--model_name_or_path", "MODEL"], False), (["train", "--model_name_or_path", "MODEL"], False),
    (["train", "--task", "arithmetic"], True), (["train", "--task", "calculator"], True)])
def test_the_bundled_tasks_run_with_pinned_cpu_numerics(seen, tmp_path, argv, pinned):
    argv = [a.replace("MODEL", str(tmp_path / "m")) for a in argv] + ["--output_dir", str(tmp_path / "o")]
    if "--model_name_or_path" in argv:  # a model dir of the user's (a config is enough: nothing loads)
        from transformers import AutoConfig
        AutoConfig.for_model("llama", hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=32).save_pretrained(str(tmp_path / "m"))
    assert cli.main(argv) == 0
    assert seen == [KEYS if pinned else {k: None for k in KEYS}]
    assert not [k for k in KEYS if k in os.environ]  # restored


def test_the_users_own_setting_stands(seen, tmp_path, monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert cli.main(["sft", "--output_dir", str(tmp_path / "o")]) == 0
    assert seen[0]["ATEN_CPU_CAPABILITY"] == "default" and os.environ["ATEN_CPU_CAPABILITY"] == "default"


def test_pinning_after_the_imports_still_reaches_torch():
    """torch reads the setting when it first computes, not at import: the CLI's imports come first."""
    code = ("import torch, fastrlhf.cli; from fastrlhf.rlhf.pipeline import cpu_numerics_pinned\n"
            "with cpu_numerics_pinned(True):\n    torch.ones(3).softmax(0)\n"
            "print(torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert out.stdout.strip().splitlines()[-1] == "AVX2", out.stdout

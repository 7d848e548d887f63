"""Entry-point checks (issue 12, part B): a user mistake in what a command is given (a model of
the wrong kind, a bad model path, an out-of-range option, a broken file, a typo) stops the run
before anything loads or is written, with one line naming the cause and the fix, exit status 2,
no traceback, and no output dir left behind. And a step run alone uses all of its data, saying so.

Most cases call `fastrlhf.cli.main(argv)` in-process (the same code path as the console script,
minus the interpreter start); one runs the real command in a subprocess.
"""
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from fastrlhf import cli
from fastrlhf.data import DataSpec, build_datasets
from fastrlhf.errors import ConfigError, DataError, ModelPathError
from fastrlhf.models.loading import load_causal_lm, load_tokenizer
from fastrlhf.models.paths import check_model_path
from fastrlhf.options import Range, config_from_dict, load_config_file
from fastrlhf.rlhf.registry import TRAINERS

BOM = "\ufeff"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A policy (causal LM with weights and tokenizer), a reward model, a run dir (actor/, critic/,
    checkpoint-10/, no model at its root) and an empty dir."""
    from fastrlhf.models.reward import RewardModel
    from toys import make_tiny_model_dir
    root = tmp_path_factory.mktemp("models")
    policy = make_tiny_model_dir(str(root / "policy"), hidden=16, layers=1, with_weights=True)
    tok = load_tokenizer(policy)
    rm = str(root / "rm")
    RewardModel.from_pretrained(policy).save_pretrained(rm)
    tok.save_pretrained(rm)
    run = root / "run"
    for sub, src in (("actor", policy), ("critic", rm), ("checkpoint-10", policy)):
        (run / sub).mkdir(parents=True)
        for f in os.listdir(src):
            (run / sub / f).write_bytes(open(os.path.join(src, f), "rb").read())
    (run / "training_config.yaml").write_text("seed: 1\n")
    (root / "empty").mkdir()
    return {"policy": policy, "rm": rm, "run": str(run), "empty": str(root / "empty"), "root": root}


@contextlib.contextmanager
def data_log():
    """(level, message) of every record of the "fastrlhf.data" logger meanwhile (whatever handlers
    and levels earlier tests left on the "fastrlhf" loggers)."""
    logger, seen = logging.getLogger("fastrlhf.data"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append((record.levelno, record.getMessage()))
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def refused(argv, capsys, *, out_dir=None):
    """Run the CLI in-process; assert exit 2, no traceback, and a one-line error as the last line
    of stderr (libraries may warn before it); return that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2, captured
    assert "Traceback" not in captured.err + captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith(f"fastrlhf {argv[0]}: error: "), captured.err
    if out_dir is not None:
        assert not os.path.exists(out_dir), f"{out_dir} was created by a refused run"
    return err


# ----------------------------------------------------------------------------- item 3: wrong kind of model

@pytest.mark.parametrize("make_argv, expected", [
    (lambda m, o: ["ppo", "--model_name_or_path", m["policy"], "--reward_model", m["policy"], "--output_dir", o],
     "is a causal LM (policy), not a reward model"),
    (lambda m, o: ["ppo", "--model_name_or_path", m["rm"], "--reward_model", m["rm"], "--output_dir", o],
     "--model_name_or_path '{rm}' is a reward model"),
    (lambda m, o: ["ppo", "--model_name_or_path", m["policy"], "--reward_model", m["rm"], "--ref_model", m["rm"],
                   "--output_dir", o], "--ref_model '{rm}' is a reward model"),
    (lambda m, o: ["sft", "--model_name_or_path", m["rm"], "--output_dir", o], "is a reward model"),
    (lambda m, o: ["dpo", "--model_name_or_path", m["policy"], "--ref_model", m["rm"], "--output_dir", o],
     "is a reward model"),
    (lambda m, o: ["chat", "--model", m["rm"], "--prompt", "hi"], "--model '{rm}' is a reward model"),
], ids=["ppo-policy-as-reward", "ppo-rm-as-actor", "ppo-rm-as-ref", "sft-rm", "dpo-rm-as-ref", "chat-rm"])
def test_wrong_kind_of_model_is_refused_saying_what_was_expected(models, tmp_path, capsys, make_argv, expected):
    out = str(tmp_path / "out")
    err = refused(make_argv(models, out), capsys, out_dir=out)
    assert expected.format(**models) in err
    assert "it must be a " in err  # what was expected


def test_the_right_kinds_pass_and_the_python_api_checks_too(models):
    from fastrlhf.rlhf.configs import PPOConfig, RMConfig
    PPOConfig(model_name_or_path=models["policy"], reward_model=models["rm"], critic_model=models["policy"],
              output_dir=str(models["root"] / "o")).check_inputs(tokenizers=True)
    RMConfig(model_name_or_path=models["rm"]).check_inputs()  # a reward model may be trained further
    with pytest.raises(ModelPathError, match="is a reward model"):
        load_causal_lm(models["rm"])
    with pytest.raises(ModelPathError, match="no value_head.safetensors"):
        check_model_path(models["policy"], "reward", option="--reward_model")


def test_ppo_with_a_policy_as_reward_model_fails_cleanly_in_the_real_command(models, tmp_path):
    out = tmp_path / "ppo_out"
    proc = subprocess.run([sys.executable, "-m", "fastrlhf.cli", "ppo", "--model_name_or_path", models["policy"],
                           "--reward_model", models["policy"], "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastrlhf ppo: error: --reward_model") and "not a reward model" in last
    assert not out.exists()


# ----------------------------------------------------------------------------- item 6: bad model paths

def test_bad_model_paths_name_the_cause(models, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    sft = ["sft", "--output_dir", out, "--model_name_or_path"]
    err = refused(sft + [str(tmp_path / "no" / "such" / "model")], capsys, out_dir=out)
    assert "no such directory" in err and "Repo id" not in err
    err = refused(sft + [models["empty"]], capsys, out_dir=out)
    assert "is an empty directory" in err and "sentencepiece" not in err.lower()
    err = refused(sft + [models["run"]], capsys, out_dir=out)
    assert "holds a training run, not a model" in err
    assert "actor/, checkpoint-10/, critic/ (reward model)" in err and f"pass {models['run']}/actor" in err
    err = refused(sft + [os.path.join(models["policy"], "config.json")], capsys, out_dir=out)
    assert "is a file" in err
    err = refused(["chat", "--model", models["run"]], capsys)
    assert "holds a training run" in err and "actor/" in err
    err = refused(["ppo", "--model_name_or_path", models["policy"], "--reward_model", models["run"],
                   "--output_dir", out], capsys, out_dir=out)
    assert "holds a training run" in err and "Fix: pass" not in err  # a run's critic is not a reward model
    err = refused(["ppo", "--model_name_or_path", models["policy"], "--reward_model", str(models["root"]),
                   "--output_dir", out], capsys, out_dir=out)
    assert "rm/ (reward model)" in err and f"Fix: pass {os.path.join(str(models['root']), 'rm')}" in err


def test_hub_names_offline_or_unreachable_get_a_clear_message(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.errors
    out = str(tmp_path / "out")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = refused(["sft", "--model_name_or_path", "no-org/not-cached-model", "--output_dir", out], capsys,
                  out_dir=out)
    assert "not in the local HF cache while the hub is offline" in err
    # online, but the hub cannot be reached (what hf_hub_download raises then, after its retries)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(repo_id, filename, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    err = refused(["sft", "--model_name_or_path", "no-org/not-cached-model", "--output_dir", out], capsys,
                  out_dir=out)
    assert "the hub could not be reached" in err


def test_train_steps_3_without_the_earlier_outputs(tmp_path, capsys):
    root = tmp_path / "run"
    err = refused(["train", "--steps", "3", "--output_dir", str(root)], capsys, out_dir=str(root))
    assert "step 3 (ppo)" in err and "step1_sft: no such directory" in err and "--steps 1" in err
    # steps 2 3: step 2 will write step2_rm, but nothing writes step1_sft: refused before step 2 runs
    err = refused(["train", "--steps", "2", "3", "--output_dir", str(root)], capsys, out_dir=str(root))
    assert "step1_sft: no such directory" in err


# ----------------------------------------------------------------------------- item 8: options, before anything

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on a CUDA machine")


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--only_optimize_lora"], "only_optimize_lora needs LoRA"),
    pytest.param(["sft", "--dtype", "fp16"], "fp16 training needs a CUDA GPU", marks=CPU_ONLY),
    (["sft", "--adam_betas", "2", "3"], "each value of adam_betas must be in [0, 1), got [2.0, 3.0]"),
    (["sft", "--adam_betas", "0.9"], "adam_betas takes two numbers"),
    (["sft", "--learning_rate", "-1"], "learning_rate must be > 0, got -1.0"),
    (["sft", "--learning_rate", "nan"], "learning_rate must be > 0, got nan"),
    (["sft", "--lora_rank", "-1"], "lora_rank must be >= 0"),
    (["sft", "--save_total_limit", "-1"], "save_total_limit must be >= 0"),
    (["rm", "--warmup_ratio", "1.5"], "warmup_ratio must be in [0, 1)"),
    (["dpo", "--beta", "0"], "beta must be > 0"),
    (["ppo", "--reward_model", "r", "--top_p", "0"], "top_p must be in (0, 1]"),
    (["ppo", "--reward_model", "r", "--gamma", "1.5"], "gamma must be in [0, 1]"),
    (["ppo", "--reward_model", "r", "--min_new_tokens", "50", "--max_new_tokens", "10"], "min_new_tokens (50)"),
    (["train", "--seed", "-1"], "seed must be in [0, 4294967296)"),
    (["train", "--ppo.ema_decay", "1"], "ema_decay must be in [0, 1)"),
])
def test_bad_options_are_refused_before_anything_is_written(argv, expected, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = refused(argv + ["--output_dir", out], capsys, out_dir=out)
    assert expected in err


def _numeric_fields(cls, prefix=""):
    """(dotted name, field, base type) of every int/float (or list of them) option of a config."""
    import typing
    from fastrlhf.options import _strip_optional
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, prefix + f.name + ".")
            continue
        base = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, typing.List) else tp
        if base in (int, float):
            yield prefix + f.name, f, base


def _outside(rng: Range, base):
    if rng.low is not None:
        return rng.low if rng.low_open else rng.low - 1
    return rng.high if rng.high_open else rng.high + 1


@pytest.mark.parametrize("cls", sorted({e.config for e in TRAINERS.values()}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_numeric_option_of_every_trainer_has_a_range_that_is_enforced(cls):
    from fastrlhf.rlhf.configs import PPOConfig
    base = {"reward_model": "r"} if issubclass(cls, PPOConfig) else {}
    checked = 0
    for dotted, f, tp in _numeric_fields(cls):
        if dotted.startswith("data.") or f.metadata.get("choices"):
            continue  # DataSpec checks its own fields (next test); choices are checked as such
        rng = cls.RANGES.get(f.name)
        assert rng is not None, f"{cls.__name__}.{f.name} has no entry in {cls.__name__}.RANGES: give it one"
        bad = _outside(rng, tp)
        value = [bad, bad] if dotted == "adam_betas" else tp(bad)
        with pytest.raises(ConfigError, match=f.name):
            config_from_dict(cls, {**base, f.name: value})
        if tp is float:
            with pytest.raises(ConfigError, match=f.name):
                config_from_dict(cls, {**base, f.name: [math.inf] * 2 if dotted == "adam_betas" else math.inf})
        checked += 1
    assert checked >= 20
    config_from_dict(cls, base)  # the defaults are inside every range


def test_every_numeric_data_option_is_checked():
    bad = {"weights": [math.nan], "eval_fraction": 1.0, "seed": -1, "max_prompt_len": 0, "max_answer_len": 0,
           "max_samples": 0}
    assert {f.name for _, f, _ in _numeric_fields(DataSpec)} == set(bad), "a new numeric DataSpec field needs a check"
    for key, value in bad.items():
        with pytest.raises(DataError, match=key):
            DataSpec(**{key: value})


# ----------------------------------------------------------------------------- item 5: a step alone uses all its data

def _rows(n, tag):
    return [{"prompt": f"w{i % 9} w{(i + 1) % 9}", "response": f"w{(i + 2) % 9} good", "id": f"{tag}{i}"}
            for i in range(n)]


def test_a_step_run_alone_uses_all_its_data_and_prints_it(models, tmp_path, capsys):
    """`fastrlhf sft` alone: all 40 rows (not the pipeline's 20% share), printed; the data and the
    config file start with a UTF-8 byte-order mark; a blended prompt-only file that gives SFT no
    rows is warned about."""
    data = tmp_path / "sft.jsonl"
    data.write_text(BOM + "\n".join(json.dumps(r) for r in _rows(40, "a")) + "\n", encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i}"}) for i in range(10)) + "\n")
    conf = tmp_path / "run.json"
    conf.write_text(BOM + json.dumps({"max_steps": 1, "micro_batch_size": 4, "cpu_threads": 1}), encoding="utf-8")
    out = tmp_path / "out"
    rc = cli.main(["sft", "--config", str(conf), "--model_name_or_path", models["policy"], "--data.paths", str(data),
                   str(prompts), "--output_dir", str(out), "--eval_max_batches", "1", "--resume", "no"])
    text = capsys.readouterr().out
    assert rc == 0
    assert f"38 train + 2 eval rows from {data} (all 40 rows; split_ratios not applied)" in text
    assert f"warning: data, step 1 (SFT): {prompts} contributes no training rows" in text
    assert "38 train / 2 eval examples" in text  # what the trainer actually got
    assert (out / "config.json").is_file()


def test_only_the_pipeline_splits_the_data(tmp_path, capsys):
    args, extra = cli.build_parser().parse_known_args(["train", "--output_dir", str(tmp_path / "o")])
    assert {c.data.split_ratios for c in cli.build_step_configs(args, extra).values()} == {"2,4,4"}
    args, extra = cli.build_parser().parse_known_args(["train", "--data.split_ratios", "1,1,1"])
    assert {c.data.split_ratios for c in cli.build_step_configs(args, extra).values()} == {"1,1,1"}
    assert DataSpec().split_ratios is None and TRAINERS["sft"].config().data.split_ratios is None
    # the pipeline's share is printed as such
    from toys import make_tiny_model_dir
    tok = load_tokenizer(make_tiny_model_dir(str(tmp_path / "m")))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(50, "b")) + "\n")
    with data_log() as seen:
        train, evals = build_datasets(DataSpec(paths=[str(path)], split_ratios="2,4,4"), tok, 1)
        alone, alone_eval = build_datasets(DataSpec(paths=[str(path)]), tok, 1)
    assert len(train) + len(evals) == 10 and len(alone) + len(alone_eval) == 50
    assert any(f"from {path} (step 1's share of its 50 rows, split_ratios 2,4,4)" in m for _, m in seen)
    assert any(f"from {path} (all 50 rows; split_ratios not applied)" in m for _, m in seen)


# ----------------------------------------------------------------------------- item 10: the small ones

def test_invalid_deepspeed_config_names_the_file_and_the_position(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": "auto",\n "zero_optimization": {"stage": 0}\n "x": 1}')
    out = str(tmp_path / "out")
    err = refused(["sft", "--deepspeed_config", str(ds), "--output_dir", out], capsys, out_dir=out)
    assert f"deepspeed_config {ds}: not valid JSON at line 3, column 2" in err
    ds.write_text(BOM + '{"train_batch_size": "auto", "fp16": {"enabled": "auto"}}', encoding="utf-8")
    from fastrlhf.config import read_deepspeed_config
    assert read_deepspeed_config(str(ds))["train_batch_size"] == "auto"  # a byte-order mark is fine


def test_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    err = refused(["sft", "--output_dir", str(f)], capsys)
    assert "is a file, not a directory" in err
    err = refused(["train", "--steps", "1", "--output_dir", str(f / "sub")], capsys)
    assert f"cannot be created: {f} is a file" in err
    assert f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_without_write_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        err = refused(["sft", "--output_dir", str(locked / "out")], capsys)
    finally:
        locked.chmod(0o700)
    assert "no write permission" in err


@pytest.mark.parametrize("argv, expected", [
    (["sft", "--learnin_rate", "1e-4"], "unknown option --learnin_rate; did you mean --learning_rate?"),
    (["ppo", "--reward_modle", "x"], "unknown option --reward_modle; did you mean --reward_model"),
    (["train", "--learnin_rate", "1e-4"], "did you mean --learning_rate"),
    (["train", "--reward_model", "x"], "--reward_model is an option of step 3 (ppo) only: pass it as "
                                       "--ppo.reward_model"),
    (["chat", "--model", "m", "--temprature", "0.5"], "did you mean --temperature?"),
])
def test_command_line_typos_get_did_you_mean(argv, expected, capsys):
    assert expected in refused(argv, capsys)


def test_byte_order_marks_in_config_and_data_files_are_accepted(tmp_path):
    for name, text in (("c.yaml", "seed: 3\n"), ("c.json", '{"seed": 3}')):
        (tmp_path / name).write_text(BOM + text, encoding="utf-8")
        assert load_config_file(str(tmp_path / name)) == {"seed": 3}
    from fastrlhf.data.sources import read_source
    (tmp_path / "d.json").write_text(BOM + json.dumps(_rows(3, "c")), encoding="utf-8")
    assert len(read_source(str(tmp_path / "d.json")).train) == 3


def test_a_bogus_kernel_backend_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("FASTRLHF_BACKEND", "bogus")
    err = refused(["ops"], capsys)
    assert "FASTRLHF_BACKEND='bogus' is not a kernel backend; set it to one of auto, torch, triton, cuda" in err
    monkeypatch.setenv("FASTRLHF_BACKEND", " Torch ")
    from fastrlhf.ops import get_backend
    assert get_backend() == "torch"


def test_blend_source_with_zero_rows_is_reported(tmp_path):
    from toys import make_tiny_model_dir
    tok = load_tokenizer(make_tiny_model_dir(str(tmp_path / "m")))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"w{i}", "chosen": "good", "rejected": "bad"})
                               for i in range(20)) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps(r) for r in _rows(20, "s")) + "\n")
    with data_log() as seen:
        build_datasets(DataSpec(paths=[str(pairs), str(sft)]), tok, 2)
        build_datasets(DataSpec(paths=[str(pairs), str(sft)], weights=[0.0, 1.0]), tok, 1)
    warnings = [m for level, m in seen if level == logging.WARNING]
    assert any(f"{sft} contributes no training rows: none of its rows has what step 2 needs" in w for w in warnings)
    assert any(f"{pairs} contributes no training rows: its weight is 0" in w for w in warnings)
    with pytest.raises(DataError, match="no training rows for step 2"):  # nothing at all is still an error
        build_datasets(DataSpec(paths=[str(sft)]), tok, 2)


def test_mistakes_found_only_at_load_are_one_line_errors_too(models, tmp_path, capsys):
    """What needs the model or the data to be seen (a LoRA target that matches no layer, fewer
    rows than one batch) still ends in one line, not a traceback."""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows(20, "d")) + "\n")
    run = ["sft", "--model_name_or_path", models["policy"], "--data.paths", str(data), "--max_steps", "1",
           "--cpu_threads", "1", "--output_dir", str(tmp_path / "out")]
    err = refused(run + ["--lora_rank", "4", "--lora_target_modules", "no_such_proj"], capsys)
    assert "--lora_target_modules: no nn.Linear matched" in err and "q_proj" in err
    err = refused(run + ["--micro_batch_size", "32"], capsys)
    assert "the training set has 19 examples, fewer than one global batch (32)" in err

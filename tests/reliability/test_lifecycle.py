"""A run's life cycle through the real `fastrlhf` command line, as a careless or unlucky user meets
it: interrupted (SIGTERM, SIGINT, kill -9 in the middle of a checkpoint write), run twice into one
dir, resumed with other data or fewer steps, pointed at another kind of model's dir, diverging,
resumed from a damaged checkpoint. Each case checks the exit status, a one-line message naming
the cause, no Traceback, and what the output dir holds afterwards.

Runs are tiny (the bundled 0.8M-parameter model, a few dozen rows, a few steps). Cases that need a
real process boundary (signals, kill -9, a second run while the first holds the lock) run in
child processes forked from one launcher that has done the slow imports once (`LAUNCHER`); the
others call `fastrlhf.cli.main` in this process (the same code path, minus the interpreter start).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastrlhf import cli

LOCK_FILE, RUN_FILE = ".fastrlhf.lock", "fastrlhf_run.json"  # the names the README documents


def checkpoint_problem(path):
    from fastrlhf.rlhf.checkpoint import checkpoint_problem as problem
    return problem(path)

TINY = ["--data.max_samples", "32", "--micro_batch_size", "8", "--eval_max_batches", "1", "--log_steps", "1"]
PPO_TINY = ["--data.max_samples", "32", "--rollout_batch_size", "4", "--micro_batch_size", "4", "--ppo_epochs", "1",
            "--eval_prompts", "4", "--max_new_tokens", "4", "--save_steps", "0", "--critic_learning_rate", "1e-3"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FASTRLHF_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A saved (untrained) reward model for the PPO runs."""
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.models.reward import RewardModel
    d = tmp_path_factory.mktemp("rm_for_ppo")
    RewardModel.from_pretrained(None, seed=2).save_pretrained(str(d))
    load_tokenizer(None).save_pretrained(str(d))
    return str(d)


def run(argv, capsys):
    """`fastrlhf ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(err: str, *needles: str) -> str:
    """The last line of stderr is the error; it names every needle, and nothing else is a traceback."""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def checkpoints(out):
    return sorted((p for p in os.listdir(out) if p.startswith("checkpoint-")), key=lambda p: (len(p), p))


def metric_rows(out):
    """metrics.jsonl, parsed strictly (a bare NaN is not JSON)."""
    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds a bare {name}")
    with open(os.path.join(out, "tensorboard", "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f]


def train_steps_logged(out):
    return [r["step"] for r in metric_rows(out) if "train/loss" in r]


# ----------------------------------------------------------------------------- subprocess helpers

def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return dict(env, FASTRLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false")


# A launcher process pays the imports (torch, transformers, DeepSpeed: most of a tiny run's time)
# once, then forks one child per job; each child is a separate process that runs
# `fastrlhf.cli.main(argv)` exactly as the `fastrlhf` script does, with its output in its own log,
# and exits with main's status. The launcher prints ("@@" + JSON) each child's pid, then each exit status.
LAUNCHER = textwrap.dedent("""
    import json, os, signal, sys, traceback
    import deepspeed, transformers.models.llama.modeling_llama  # noqa: F401 (imported once, shared by the children)
    from fastrlhf import cli
    from fastrlhf.rlhf import checkpoint

    def kill_during_save(step):  # SIGKILL once the model files of checkpoint-<step> are written, before the rest
        real = checkpoint._save_module
        def save_then_die(module, out_dir, sd):
            real(module, out_dir, sd)
            if f"checkpoint-{step}" in out_dir:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._save_module = save_then_die

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            if job.get("own_group"):  # a job of its own, as a shell starts one: signals go to its group
                os.setpgid(0, 0)
            os.environ.update(job.get("env", {}))
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 1
            try:
                if job.get("kill_during_save"):
                    kill_during_save(job["kill_during_save"])
                sys.argv = ["fastrlhf", *job["argv"]]
                code = cli.main(job["argv"]) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print("@@" + json.dumps({"name": job["name"], "pid": pid}), flush=True)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        print("@@" + json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), flush=True)
""")


class Launcher:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env())
        self.pids = {}

    def start(self, name, argv, log, **options):
        self.proc.stdin.write(json.dumps({"name": name, "argv": argv, "log": str(log), **options}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        while not line.startswith("@@"):  # the libraries' own chatter
            assert line, "the launcher died"
            line = self.proc.stdout.readline()
        line = json.loads(line[2:])
        assert line["name"] == name
        self.pids[name] = line["pid"]
        return line["pid"]

    def statuses(self, timeout=300):
        """{name: exit status} once every child has ended (-N: killed by signal N)."""
        self.proc.wait(timeout=timeout)
        out = self.proc.stdout.read()
        by_pid = {v: k for k, v in self.pids.items()}
        rows = [json.loads(line[2:]) for line in out.splitlines() if line.startswith("@@")]
        return {by_pid[r["pid"]]: r["status"] for r in rows}


def wait_until_training(pid, out, log, timeout=240):
    """Until the run in `out` has logged a training step."""
    path = os.path.join(out, "tensorboard", "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path) and '"train/' in open(path).read():
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise AssertionError("the run ended before training:\n" + open(log).read()[-3000:])
        time.sleep(0.1)
    raise AssertionError(f"no training step logged in {timeout}s:\n" + open(log).read()[-3000:])


# ----------------------------------------------------------------------------- signals, lock, kill -9

def test_signals_lock_and_kill9_through_the_cli(tmp_path, reward_dir, capsys):
    """SFT, RM, DPO and PPO get SIGTERM (DPO: SIGINT) mid-run: each saves a checkpoint and exits
    128+signal with one line. While the SFT run is alive a second run into its dir is refused.
    A run killed -9 while writing checkpoint-4 leaves checkpoint-2 as what resume picks, and its
    stale lock is cleared with a warning."""
    long = ["--num_epochs", "100000"]
    runs = {
        "sft": (["sft", *TINY, *long], signal.SIGTERM),
        "rm": (["rm", *TINY, *long], signal.SIGTERM),
        "dpo": (["dpo", *TINY, *long], signal.SIGINT),
        "ppo": (["ppo", "--reward_model", reward_dir, *PPO_TINY, "--num_epochs", "1000", "--max_steps", "100000"],
                signal.SIGTERM),
    }
    launcher = Launcher()
    outs = {name: str(tmp_path / name) for name in runs}
    for name, (argv, _) in runs.items():
        launcher.start(name, [*argv, "--output_dir", outs[name]], tmp_path / f"{name}.log")
    killed_out = str(tmp_path / "killed")
    killed_pid = launcher.start("killed", ["sft", *TINY, "--max_steps", "6", "--save_steps", "2",
                                           "--save_total_limit", "0", "--output_dir", killed_out],
                                tmp_path / "killed.log", kill_during_save=4)
    launcher.proc.stdin.close()

    for name in runs:
        wait_until_training(launcher.pids[name], outs[name], tmp_path / f"{name}.log")
    # a second run into a dir whose run is alive: refused before it writes anything there
    sft_out = outs["sft"]
    config_before = open(os.path.join(sft_out, "training_config.yaml")).read()
    rc, _, err = run(["sft", *TINY, "--max_steps", "2", "--learning_rate", "1e-3", "--output_dir", sft_out], capsys)
    assert rc == 2
    one_line_error(err, f"output_dir {sft_out} is in use by another fastrlhf run",
                   f"process {launcher.pids['sft']}", "--output_dir")
    assert open(os.path.join(sft_out, "training_config.yaml")).read() == config_before

    for name, (_, signum) in runs.items():
        os.kill(launcher.pids[name], signum)
    status = launcher.statuses()
    for name, (_, signum) in runs.items():
        out, log = outs[name], open(tmp_path / f"{name}.log").read()
        assert status[name] == 128 + signum, (name, log[-3000:])
        assert "Traceback" not in log, log[-3000:]
        saved = [line for line in log.splitlines() if f"signal {int(signum)}: checkpoint saved to" in line]
        assert len(saved) == 1, log[-3000:]
        (ckpt,) = checkpoints(out)
        assert saved[0].split("checkpoint saved to ")[1].startswith(os.path.join(out, ckpt))
        assert checkpoint_problem(os.path.join(out, ckpt)) is None
        assert not os.path.exists(os.path.join(out, LOCK_FILE)), name  # released on the way out
        assert json.load(open(os.path.join(out, RUN_FILE)))["status"] == "stopped"

    assert status["killed"] == -signal.SIGKILL, open(tmp_path / "killed.log").read()[-3000:]
    assert checkpoints(killed_out) == ["checkpoint-2", "checkpoint-4.partial"]
    assert json.load(open(os.path.join(killed_out, LOCK_FILE)))["pid"] == killed_pid
    rc, out, err = run(["sft", *TINY, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "0",
                        "--output_dir", killed_out], capsys)
    assert rc == 0, err[-3000:]
    assert f"cleared a stale lock of a run that is no longer running (process {killed_pid}" in out
    assert f"resumed from {os.path.join(killed_out, 'checkpoint-2')} at step 2" in out
    assert checkpoints(killed_out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert train_steps_logged(killed_out) == [1, 2, 3, 4, 5, 6]  # the killed run's rows after step 2 are gone
    assert not os.path.exists(os.path.join(killed_out, LOCK_FILE))


# ----------------------------------------------------------------------------- resume rules

def test_resume_refuses_another_run_and_a_checkpoint_past_the_end(tmp_path, capsys):
    out = str(tmp_path / "r")
    other = tmp_path / "other.jsonl"
    from fastrlhf.tasks.default_task import default_data_path
    other.write_text("".join(open(default_data_path()).readlines()[:200]))
    rc, _, err = run(["sft", *TINY, "--max_steps", "4", "--save_steps", "2", "--output_dir", out], capsys)
    assert rc == 0, err
    model = open(os.path.join(out, "model.safetensors"), "rb").read()

    rc, _, err = run(["sft", *TINY, "--data.paths", str(other), "--output_dir", out], capsys)
    assert rc == 2
    one_line_error(err, f"{out}/checkpoint-4 was saved by a different run", "data.paths [] -> ", "other.jsonl",
                   "--resume no", "--output_dir")
    rc, _, err = run(["sft", *TINY, "--learning_rate", "5e-3", "--max_steps", "4", "--output_dir", out], capsys)
    assert rc == 2
    one_line_error(err, "learning_rate 0.003 -> 0.005")
    rc, _, err = run(["sft", *TINY, "--max_steps", "2", "--output_dir", out], capsys)
    assert rc == 2
    one_line_error(err, "is at step 4, past the 2 steps of this run", "--max_steps")
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == model  # nothing was overwritten
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]

    # the way out the message offers: --resume no starts over; the old run's checkpoints go at the first save
    rc, stdout, err = run(["sft", *TINY, "--data.paths", str(other), "--max_steps", "3", "--save_steps", "3",
                           "--resume", "no", "--output_dir", out], capsys)
    assert rc == 0, err
    assert "earlier checkpoint(s)" in stdout and "eval before training: loss" in stdout
    assert checkpoints(out) == ["checkpoint-3"]
    assert train_steps_logged(out) == [1, 2, 3]  # metrics.jsonl holds this run only
    assert open(os.path.join(out, "model.safetensors"), "rb").read() != model
    # and a later `--resume auto` with the same options continues this run, not the old one
    rc, stdout, err = run(["sft", *TINY, "--data.paths", str(other), "--max_steps", "3", "--save_steps", "3",
                           "--output_dir", out], capsys)
    assert rc == 0, err
    assert "already holds all 3 steps of this run" in stdout
    assert "eval before training (at the start of the run resumed from" in stdout


def test_damaged_checkpoints_fall_back_to_the_newest_valid_one(tmp_path, capsys):
    base = str(tmp_path / "base")
    rc, _, err = run(["rm", *TINY, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0",
                      "--output_dir", base], capsys)
    assert rc == 0, err
    cases = {"trainer_state.json": "checkpoint-3/trainer_state.json", "model.safetensors": "checkpoint-3/model.safetensors",
             "rank state": "checkpoint-3/rank_state_0.pt"}
    for what, rel in cases.items():
        out = str(tmp_path / what.replace(" ", "_"))
        shutil.copytree(base, out)
        path = os.path.join(out, rel)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        rc, stdout, err = run(["rm", *TINY, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "0",
                               "--output_dir", out], capsys)
        assert rc == 0, (what, err[-2000:])
        assert "Traceback" not in err
        warning = [line for line in stdout.splitlines() if "is damaged" in line]
        assert len(warning) == 1 and path in warning[0], (what, stdout)
        assert f"resuming from {os.path.join(out, 'checkpoint-2')} instead" in warning[0]
        assert f"resumed from {os.path.join(out, 'checkpoint-2')} at step 2" in stdout
        assert checkpoint_problem(os.path.join(out, "checkpoint-3")) is None  # rewritten whole by the resumed run
    # every checkpoint damaged: refused (nothing is silently restarted over them)
    for step in (1, 2, 3):
        open(os.path.join(base, f"checkpoint-{step}", "trainer_state.json"), "w").write('{"step": ')
    rc, _, err = run(["rm", *TINY, "--max_steps", "4", "--output_dir", base], capsys)
    assert rc == 2
    one_line_error(err, f"no usable checkpoint in {base}", "checkpoint-3/trainer_state.json is not valid JSON",
                   "--resume no")


# ----------------------------------------------------------------------------- divergence

@pytest.mark.parametrize("command", ["sft", "rm", "dpo"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, command):
    out = str(tmp_path / command)
    rc, stdout, err = run([command, *TINY, "--max_steps", "8", "--save_steps", "1", "--learning_rate", "1e3",
                           "--output_dir", out], capsys)
    assert rc == 1
    line = one_line_error(err, f"fastrlhf {command}: stopped: 3 consecutive steps had NaN/inf", "lower --learning_rate",
                          "the last good checkpoint is")
    last_good = line.split("the last good checkpoint is ")[1].split(" ")[0]
    assert "the update was skipped (1 in a row" in stdout
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no final model
    assert checkpoints(out)[-1] == os.path.basename(last_good) and checkpoint_problem(last_good) is None
    from safetensors.torch import load_file
    import torch
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(last_good, "model.safetensors")).values())
    assert json.load(open(os.path.join(out, RUN_FILE)))["status"] == "diverged"
    assert train_steps_logged(out) == [1, 2, 3]  # metrics.jsonl parses as strict JSON


def test_ppo_divergence_stops_before_sampling_from_a_broken_actor(tmp_path, reward_dir, capsys):
    out = str(tmp_path / "ppo")
    rc, _, err = run(["ppo", "--reward_model", reward_dir, *PPO_TINY, "--max_steps", "8", "--save_steps", "2",
                      "--learning_rate", "1e3", "--critic_learning_rate", "1e3", "--output_dir", out], capsys)
    assert rc == 1
    one_line_error(err, "fastrlhf ppo: stopped: 3 consecutive PPO steps had NaN/inf", "lower --learning_rate",
                   f"the last good checkpoint is {out}/checkpoint-2")
    assert not os.path.exists(os.path.join(out, "actor"))


def test_ppo_stops_when_a_step_leaves_the_actor_weights_non_finite(tmp_path, reward_dir):
    """Gradients can be finite and the update still break the weights: checked after every step."""
    import torch
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.errors import TrainingDiverged
    from fastrlhf.rlhf.ppo import PPOTrainer
    from fastrlhf.data import DataSpec
    cfg = PPOConfig(reward_model=reward_dir, output_dir=str(tmp_path / "w"), rollout_batch_size=4, micro_batch_size=4,
                    max_new_tokens=4, eval_prompts=4, max_steps=3, learning_rate=1e-3,
                    data=DataSpec(max_samples=32), cpu_threads=1)
    trainer = PPOTrainer(cfg)
    victim = next(p for p in trainer.actor.module.parameters() if p.ndim == 2)
    trainer.actor.optimizer.register_step_post_hook(lambda *_: victim.data.fill_(float("nan")))
    with pytest.raises(TrainingDiverged, match="the actor weights became NaN/inf at step 1"):
        trainer.run()
    assert not os.path.exists(tmp_path / "w" / "actor")
    assert not torch.isfinite(victim).all()


# ----------------------------------------------------------------------------- what a dir holds

def test_another_kind_of_model_is_not_overwritten_without_asking(tmp_path, capsys):
    rm_dir = str(tmp_path / "rm")
    rc, _, err = run(["rm", *TINY, "--max_steps", "1", "--output_dir", rm_dir], capsys)
    assert rc == 0, err
    head = open(os.path.join(rm_dir, "value_head.safetensors"), "rb").read()
    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--output_dir", rm_dir], capsys)
    assert rc == 2
    one_line_error(err, f"output_dir {rm_dir} holds a reward model", "this sft run would overwrite it",
                   "--overwrite_output_dir")
    assert open(os.path.join(rm_dir, "value_head.safetensors"), "rb").read() == head
    assert not os.path.exists(os.path.join(rm_dir, LOCK_FILE))

    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--overwrite_output_dir", "true", "--output_dir", rm_dir], capsys)
    assert rc == 0, err
    # the reward model's own files went with it: the dir is now a plain causal LM, nothing stale to load
    assert not os.path.exists(os.path.join(rm_dir, "value_head.safetensors"))
    assert not os.path.exists(os.path.join(rm_dir, "reward_model.json"))
    assert json.load(open(os.path.join(rm_dir, RUN_FILE)))["trainer"] == "sft"


def test_rewritten_model_and_checkpoint_keep_no_stray_files(tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["sft", *TINY, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0", "--output_dir", out]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    fresh = sorted(os.listdir(os.path.join(out, "checkpoint-4")))
    # leftovers of earlier saves: a LoRA adapter at the root (would be applied on load), a temp file in a checkpoint
    open(os.path.join(out, "fastrlhf_lora.json"), "w").write("{}")
    open(os.path.join(out, "checkpoint-4", "model.safetensors.tmp"), "w").write("x")
    rc, _, err = run([*args, "--resume", os.path.join(out, "checkpoint-2")], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(os.path.join(out, "checkpoint-4"))) == fresh
    assert not os.path.exists(os.path.join(out, "fastrlhf_lora.json"))
    assert not [p for p in os.listdir(out) if p.endswith((".partial", ".replaced", ".tmp"))]
    from fastrlhf.models.loading import load_causal_lm
    load_causal_lm(out)


def test_a_model_that_does_not_read_back_whole_is_not_a_checkpoint(tmp_path, capsys, monkeypatch):
    from fastrlhf.rlhf import checkpoint
    real = checkpoint._save_module

    def save_short(module, out_dir, sd):  # a disk that fills up without an error: the weights come out short
        real(module, out_dir, sd)
        if "checkpoint-2" in out_dir:
            path = os.path.join(out_dir, "model.safetensors")
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - 100)
    monkeypatch.setattr(checkpoint, "_save_module", save_short)
    out = str(tmp_path / "r")
    rc, _, err = run(["sft", *TINY, "--max_steps", "3", "--save_steps", "1", "--output_dir", out], capsys)
    assert rc == 1
    one_line_error(err, "did not read back whole", "checkpoint-2.partial/.model.partial/model.safetensors is truncated")
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2.partial"]  # never marked complete


def test_no_eval_data_is_said_not_printed_as_nan(tmp_path, capsys):
    out = str(tmp_path / "r")
    rc, stdout, err = run(["sft", *TINY, "--max_steps", "2", "--data.eval_fraction", "0", "--output_dir", out], capsys)
    assert rc == 0, err
    assert "no eval data" in stdout and "nan" not in stdout.lower()
    assert "summary: step 1 SFT: 2 steps (no eval data)" in stdout
    json.load(open(os.path.join(out, "eval_before_after.json")))
    assert train_steps_logged(out) == [1, 2]
    # a second fresh run into the same dir: metrics.jsonl starts over
    rc, _, err = run(["sft", *TINY, "--max_steps", "1", "--data.eval_fraction", "0", "--output_dir", out], capsys)
    assert rc == 0, err
    assert train_steps_logged(out) == [1]


def test_metrics_are_strict_json_lines(tmp_path):
    from fastrlhf.utils.logging import MetricsLogger
    logger = MetricsLogger(str(tmp_path))
    logger.log({"train/loss": float("nan"), "train/lr": 1e-3, "eval/x": float("inf")}, 1)
    logger.close()
    (row,) = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
              for line in open(tmp_path / "metrics.jsonl")]
    assert row == {"step": 1, "train/loss": None, "train/lr": 1e-3, "eval/x": None}


# ----------------------------------------------------------------------------- the guard's parts

def test_lock_without_flock_judges_by_the_recorded_process(tmp_path, monkeypatch):
    """On a filesystem without flock: a live process on this host, or any on another host, keeps
    the lock (the message says what to delete); a dead one's lock is stale."""
    import socket
    from fastrlhf.errors import ConfigError
    from fastrlhf.rlhf.run_setup import OutputDirLock
    monkeypatch.setattr(OutputDirLock, "_flock", staticmethod(lambda fd: None))
    lock_file = tmp_path / LOCK_FILE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for holder, expected in [({"pid": os.getppid(), "host": socket.gethostname()}, "is in use by another fastrlhf run"),
                             ({"pid": 1, "host": "elsewhere"}, f"cannot be checked from here: if that run has ended, "
                                                               f"delete {lock_file}"),
                             ({"pid": dead.pid, "host": socket.gethostname()}, None)]:
        lock_file.write_text(json.dumps({**holder, "command": "fastrlhf sft"}))
        if expected:
            with pytest.raises(ConfigError, match=expected):
                OutputDirLock(str(tmp_path)).acquire("sft")
            assert json.loads(lock_file.read_text())["pid"] == holder["pid"]  # left as it was
        else:
            lock = OutputDirLock(str(tmp_path)).acquire("sft")
            assert f"process {dead.pid}" in lock.stale_note
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            lock.release()
            assert not lock_file.exists()


def test_fingerprint_names_a_changed_model_or_data_file(tmp_path):
    from fastrlhf.data import DataSpec
    from fastrlhf.rlhf.configs import SFTConfig
    from fastrlhf.rlhf.fingerprint import fingerprint_diff, run_fingerprint
    from toys import make_tiny_model_dir
    model = make_tiny_model_dir(str(tmp_path / "m"), with_weights=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b"}\n')
    cfg = SFTConfig(model_name_or_path=model, data=DataSpec(paths=[str(data)]), output_dir=str(tmp_path / "o"))
    saved = run_fingerprint(cfg, "sft")
    # what does not change the math does not count: where to write, how often to log, how long to run
    later = SFTConfig(model_name_or_path=model, data=DataSpec(paths=[str(data)]), output_dir=str(tmp_path / "x"),
                      log_steps=1, max_steps=7, save_steps=3)
    assert fingerprint_diff(saved, run_fingerprint(later, "sft")) == []
    data.write_text('{"prompt": "a", "chosen": "c"}\n')
    assert fingerprint_diff(saved, run_fingerprint(cfg, "sft")) == ["the content of the data files changed"]
    data.write_text('{"prompt": "a", "chosen": "b"}\n')
    with open(os.path.join(model, "model.safetensors"), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert fingerprint_diff(saved, run_fingerprint(cfg, "sft")) == [f"the content of model_name_or_path {model} changed"]
    assert fingerprint_diff(saved, run_fingerprint(cfg, "dpo"))[0] == "trainer sft -> dpo"


def test_the_fingerprint_leaves_out_exactly_the_options_defined_so():
    """`option(..., fingerprint=False)` marks what does not change what is learned; an override in
    a trainer's config must keep the mark (else its runs would refuse their own checkpoints)."""
    import dataclasses

    from fastrlhf.options import in_fingerprint, option_names
    from fastrlhf.rlhf.configs import DPOConfig, PPOConfig, RMConfig, SFTConfig
    from fastrlhf.rlhf.fingerprint import run_fingerprint
    shared = {"output_dir", "resume", "overwrite_output_dir", "log_steps", "save_steps", "save_total_limit",
              "eval_steps", "eval_max_batches", "eval_batch_size", "tensorboard_dir", "cpu_threads", "max_steps",
              "num_epochs", "merge_lora_on_save", "max_nonfinite_steps", "gradient_checkpointing", "deepspeed_config",
              "packing", "max_tokens_per_micro_batch",  # packed = padded math, to fp32 rounding
              "report_to"}
    for cls, own in ((SFTConfig, set()), (RMConfig, set()), (DPOConfig, set()),
                     (PPOConfig, {"eval_prompts", "generation_fallback", "reward_timeout", "reward_retries",
                                  "reward_concurrency", "reward_request_size",
                                  "env_timeout", "env_workers", "log_rollouts",  # how agents run, not what
                                  "share_prompts"})):  # a shared prompt = its copies' math, to fp32 rounding
        left_out = {f.name for f in dataclasses.fields(cls) if not in_fingerprint(f)}
        assert left_out == shared | own, cls.__name__
        cfg = cls(reward_fn=["fastrlhf.rewards:arithmetic_reward"]) if cls is PPOConfig else cls()
        fp = run_fingerprint(cfg, "x")
        assert set(fp) & (left_out | {"data.cache_dir"}) == set()
        assert set(option_names(cls)) - left_out - {"data.cache_dir"} <= set(fp)

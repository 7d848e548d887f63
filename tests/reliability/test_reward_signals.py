"""Ctrl-C and SIGTERM sent to a run's process group (what a terminal and a cluster scheduler do)
while its rewards are being computed: the reward workers do not take the group's signals, the
trainer finishes the step, saves and exits 128+N, with no traceback. In real processes: each run
is a job (its own process group) forked from one launcher (test_lifecycle.Launcher); the reward
function runs in the run's worker, the reward server in this test's process."""
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_lifecycle import LOCK_FILE, RUN_FILE, Launcher, checkpoint_problem, checkpoints, wait_until_training

FNS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rewards", "fns.py")


class _SlowReward(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.started.append(time.monotonic())
        time.sleep(1.0)  # the test signals while this request is in flight
        out = json.dumps({"rewards": [float(len(c) % 2) for c in body["completions"]]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _SlowReward)
    srv.daemon_threads, srv.started = True, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/reward"
    yield srv
    srv.shutdown()
    srv.server_close()


def _wait_for(what, condition, pid, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise AssertionError(f"the run ended before {what}:\n" + open(log).read()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"not {what} within {timeout}s:\n" + open(log).read()[-3000:])


def test_group_signals_during_reward_calls_save_and_exit(tmp_path, server):
    """SIGTERM while the reward function runs in its worker; SIGINT (Ctrl-C) while a request to
    the reward server is in flight. Each: the step finishes, a checkpoint is saved, exit 128+N."""
    grpo = ["ppo", "--algo", "grpo", "--group_size", "2", "--reward_fn", f"{FNS}:slow_and_marked",
            "--reward_url", server.url, "--data.max_samples", "32", "--rollout_batch_size", "2",
            "--micro_batch_size", "4", "--max_new_tokens", "4", "--eval_prompts", "2", "--num_epochs", "1000",
            "--max_steps", "100000", "--save_steps", "0", "--reward_timeout", "30", "--log_steps", "1"]
    runs = {"fn_sigterm": signal.SIGTERM, "server_sigint": signal.SIGINT}
    launcher = Launcher()
    outs, logs, markers = {}, {}, {}
    for name in runs:
        outs[name], logs[name], markers[name] = (str(tmp_path / name), tmp_path / f"{name}.log",
                                                 str(tmp_path / f"{name}.calls"))
        launcher.start(name, [*grpo, "--output_dir", outs[name]], logs[name], own_group=True,
                       env={"REWARD_MARKER": markers[name], "REWARD_SLEEP": "1.0"})
    launcher.proc.stdin.close()

    def calls(name):
        return open(markers[name]).read().count("call") if os.path.exists(markers[name]) else 0

    for name, signum in runs.items():
        pid = launcher.pids[name]
        wait_until_training(pid, outs[name], logs[name])
        if name == "fn_sigterm":  # a call starting after training began: the function is sleeping in it
            n = calls(name)
            _wait_for("a reward function call", lambda: calls(name) > n, pid, logs[name])
        else:
            n = len(server.started)
            _wait_for("a reward server request", lambda: len(server.started) > n, pid, logs[name])
        os.killpg(pid, signum)  # to the whole group, as a terminal or a scheduler sends it

    status = launcher.statuses()
    for name, signum in runs.items():
        out, log = outs[name], open(logs[name]).read()
        assert status[name] == 128 + signum, (name, log[-3000:])
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        assert f"signal {int(signum)}: checkpoint saved to" in log, log[-3000:]
        (ckpt,) = checkpoints(out)
        assert checkpoint_problem(os.path.join(out, ckpt)) is None
        assert json.load(open(os.path.join(out, RUN_FILE)))["status"] == "stopped"
        assert not os.path.exists(os.path.join(out, LOCK_FILE))

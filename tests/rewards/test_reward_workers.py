"""Reward functions are user code: it runs in worker processes only, never in the trainer's. A
module whose import hangs or ends the process is a clear error within --reward_timeout; a
function that forks cannot make a later batch read an earlier batch's reply; a server that
trickles its answer cannot hold a request past --reward_timeout."""
import os
import socket
import sys
import threading
import time

import pytest

from fastrlhf.errors import ConfigError, RewardError, RewardTimeoutError
from fastrlhf.rewards.worker import FunctionWorker

FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fns.py")


def ppo_config(tmp_path, specs, timeout=60.0):
    from fastrlhf.rlhf.configs import PPOConfig
    return PPOConfig(reward_fn=specs, reward_timeout=timeout, output_dir=str(tmp_path / "out"))


def test_reward_modules_are_checked_in_a_worker_never_imported_here(tmp_path, monkeypatch):
    (tmp_path / "trust_probe_rewards.py").write_text("IMPORTED = True\n\ndef score(prompts, completions, **_):\n"
                                                    "    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    cfg = ppo_config(tmp_path, ["trust_probe_rewards:score", f"{tmp_path}/trust_probe_rewards.py:score"])
    cfg.validate()
    cfg.check_reward_functions()
    loaded = [m for m in list(sys.modules.values())
              if os.path.abspath(getattr(m, "__file__", None) or "/") == str(tmp_path / "trust_probe_rewards.py")]
    assert loaded == []  # the user's module never ran in this process
    # a function that is not there is still found before any model loads, by the worker
    with pytest.raises(ConfigError, match="trust_probe_rewards has no function 'nope'; it defines score"):
        ppo_config(tmp_path, ["trust_probe_rewards:nope"]).check_reward_functions()


@pytest.mark.timeout(120)
def test_an_import_that_hangs_or_exits_is_a_clear_error_within_the_timeout(tmp_path):
    (tmp_path / "hangs_at_import.py").write_text("import time\ntime.sleep(600)\n\ndef fn(p, c, **_):\n    return []\n")
    (tmp_path / "exits_at_import.py").write_text("import os\nos._exit(3)\n\ndef fn(p, c, **_):\n    return []\n")
    t0 = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"hangs_at_import.py:fn\): importing its module did not finish "
                                                 r"within 5s \(--reward_timeout 1\)"):
        ppo_config(tmp_path, [f"{tmp_path}/hangs_at_import.py:fn"], timeout=1.0).check_reward_functions()
    assert time.monotonic() - t0 < 30
    with pytest.raises(RewardError, match=r"ended while importing the module \(exit code 3"):
        ppo_config(tmp_path, [f"{tmp_path}/exits_at_import.py:fn"]).check_reward_functions()


def test_a_function_that_forks_cannot_answer_for_a_later_batch():
    w = FunctionWorker(f"{FNS}:forks_and_returns", "forks_and_returns", 10.0)
    try:
        assert w.call(["p", "q"], ["ab", "c"], {}) == [2.0, 1.0]
        assert w.call(["p"], ["xyz"], {}) == [3.0]
        assert w.call(["p", "q", "r"], ["a", "bb", "cccc"], {}) == [1.0, 2.0, 4.0]
    finally:
        w.close()


def test_a_reply_to_another_request_is_refused(monkeypatch):
    from fastrlhf import workers as worker_mod
    w = FunctionWorker(f"{FNS}:none_for_empty", "none_for_empty", 10.0)
    w.wait_ready()
    real_read = worker_mod._read
    monkeypatch.setattr(worker_mod, "_read", lambda fd, deadline: ("ok", 0, real_read(fd, deadline)[2]))
    with pytest.raises(RewardError, match="its worker answered request 0 while request 1 was waiting"):
        w.call(["p"], ["a"], {})
    assert w.proc is None  # restarted: the next call gets a fresh worker
    w.close()


def test_a_server_that_trickles_its_answer_meets_a_deadline_per_request():
    """--reward_timeout is the whole request's deadline, not one per socket read."""
    from fastrlhf.rewards.http import HTTPReward
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                conn.recv(65536)
                body = b'{"rewards": [1.0]}'
                reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + \
                    str(len(body)).encode() + b"\r\n\r\n" + body
                for i in range(len(reply)):  # one byte every 0.2 s: no single read waits 1 s
                    if stop.is_set():
                        break
                    conn.sendall(reply[i:i + 1])
                    time.sleep(0.2)
            except OSError:
                pass
            finally:
                conn.close()
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/reward"
    client = HTTPReward(url, timeout=1.0, retries=1, backoff=0.05)
    t0 = time.monotonic()
    try:
        with pytest.raises(RewardError, match=f"reward server {url} failed 2 times .*no complete answer within 1s"):
            client(["p"], ["a"])
        assert time.monotonic() - t0 < 4  # 2 requests of at most 1 s each, plus the backoff
    finally:
        stop.set()
        srv.close()
        thread.join(timeout=10)

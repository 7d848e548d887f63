"""Reward sources: user functions in worker processes, HTTP servers (a real one on 127.0.0.1),
their weighted mix, and every kind of bad input, each a clear one-line error naming the source."""
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastrlhf.errors import ConfigError, RewardError, RewardTimeoutError
from fastrlhf.rewards.http import HTTPReward
from fastrlhf.rewards.sources import RewardSet, in_process
from fastrlhf.rewards.worker import FunctionWorker

FNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fns.py")


def worker(name, timeout=10.0):
    return (name, FunctionWorker(f"{FNS}:{name}", name, timeout))


def test_worker_runs_the_function_with_the_columns_and_mixes_sources_by_weight():
    rs = RewardSet([worker("length_and_answer"), in_process(lambda p, c, **_: [1.0] * len(c), "one")],
                   weights=[1.0, 0.5, 2.0], has_model=True)
    r = rs.compute(["p1", "p2", "p3"], ["ab", "c", ""], {"answer": ["ab", "x", "y"]}, model_scores=[1.0, 2.0, 3.0])
    # model (weight 1) + 0.5 * (len + 100 if exact) + 2 * 1
    assert r.total == [1 + 0.5 * 102 + 2, 2 + 0.5 * 1 + 2, 3 + 0 + 2]
    st = r.stats()
    assert st["reward_length_and_answer_mean"] == pytest.approx(103 / 3)
    assert st["reward_reward_model_std"] == pytest.approx(1.0) and st["rewardless_samples"] == 0
    rs.close()


def test_none_leaves_a_sample_without_reward():
    rs = RewardSet([worker("none_for_empty")], has_model=True)
    r = rs.compute(["a", "b"], ["x", ""], {}, model_scores=[0.5, 0.5])
    assert r.total == [1.5, None] and r.stats()["rewardless_samples"] == 1.0
    rs.close()


def test_a_raising_function_names_itself_the_exception_and_one_offending_prompt():
    rs = RewardSet([worker("raises_on_bad")])
    with pytest.raises(RewardError, match=r"raises_on_bad raised ZeroDivisionError: cannot score this one .*"
                                          r"one offending prompt: 'the bad prompt'"):
        rs.compute(["fine", "the bad prompt", "fine too"], ["a", "b", "c"], {})
    rs.close()


@pytest.mark.parametrize("name, message", [
    ("wrong_length", "wrong_length returned 3 rewards for 2 completions"),
    ("gives_nan", "gives_nan returned nan as reward 0"),
    ("gives_string", "gives_string returned str '1.0' as reward 0"),
    ("gives_scalar", "gives_scalar returned a float"),
])
def test_bad_return_values_are_clear_errors_naming_the_function(name, message):
    rs = RewardSet([worker(name)])
    with pytest.raises(RewardError, match=message):
        rs.compute(["p", "q"], ["a", "b"], {})
    rs.close()


def test_a_hanging_function_times_out_instead_of_freezing_the_run():
    name, w = worker("hangs", timeout=1.0)
    w.wait_ready()
    t0 = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="hangs did not return within --reward_timeout 1s"):
        RewardSet([(name, w)]).compute(["p"], ["a"], {})
    assert time.monotonic() - t0 < 5
    assert w.proc is None   # the stuck worker was killed; a later call would start a fresh one


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
    ("missing/file.py:fn", "the file .*missing/file.py does not exist"),
    (f"{FNS}:no_such_fn", "has no function 'no_such_fn'; it defines .*hangs"),
    (f"{FNS}:not_a_function", "not_a_function .* is a int, not a function"),
    ("fastrlhf.rewards", "is not 'package.module:function'"),
])
def test_bad_reward_fn_specs_fail_when_the_config_is_validated(spec, message, tmp_path):
    """The form and a missing file when the config is built; a missing module or function in the
    worker's check (`check_reward_functions`, before any model loads)."""
    from fastrlhf.rlhf.configs import PPOConfig
    with pytest.raises(ConfigError, match=message):
        PPOConfig(reward_fn=[spec], output_dir=str(tmp_path)).check_reward_functions()
    with pytest.raises(ConfigError, match="needs a reward"):
        PPOConfig(output_dir=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="2 values for 1 reward sources"):
        PPOConfig(reward_fn=["fastrlhf.rewards:format_reward"], reward_weights=[1, 2],
                  output_dir=str(tmp_path)).validate()


# ----------------------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
            if server.requests >= server.max_requests:   # bounded: the server stops by itself
                threading.Thread(target=server.shutdown, daemon=True).start()
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.bodies.append(body)
            if server.mode == "slow":
                time.sleep(1.0)
            if server.mode == "malformed":
                out = b"{not json"
            else:
                time.sleep(0.05)
                out = json.dumps({"rewards": [len(c) * w for c, w in zip(body["completions"], body["weight"])]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with server.lock:
                server.in_flight -= 1


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock, srv.requests, srv.in_flight, srv.peak, srv.bodies = threading.Lock(), 0, 0, 0, []
    srv.mode, srv.max_requests = "ok", 50
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/reward"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def test_http_source_sends_columns_in_chunks_with_bounded_concurrency(server):
    client = HTTPReward(server.url, timeout=5, retries=0, concurrency=2, request_size=2)
    comps = ["a", "bb", "ccc", "dddd", "eeeee"]
    assert client(["p"] * 5, comps, weight=[1, 1, 2, 2, 3]) == [1, 2, 6, 8, 15]
    assert server.requests == 3 and 1 <= server.peak <= 2
    assert sorted(b["completions"][0] for b in server.bodies) == ["a", "ccc", "eeeee"]
    assert set(server.bodies[0]) == {"prompts", "completions", "weight"}


@pytest.mark.parametrize("mode, message", [
    ("down", "cannot connect"),
    ("slow", "no complete answer within 0.3s"),
    ("malformed", "the reply is not JSON"),
])
def test_http_failures_retry_then_name_the_url(server, mode, message):
    url = server.url
    if mode == "down":
        with socket.socket() as s:        # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/reward"
    server.mode = mode
    client = HTTPReward(url, timeout=0.3, retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=f"reward server {url} failed 3 times .*{message}"):
        client(["p"], ["a"], weight=[1])
    assert time.monotonic() - t0 < 5
    if mode != "down":
        assert server.requests == 3   # the first try and two retries

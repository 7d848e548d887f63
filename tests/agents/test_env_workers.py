"""Environments and tools run in worker processes: specs checked before any model loads, steps
checked in the worker, failures of user code a one-line AgentError naming the class, the problem
and the prompt; bad tool calls answered to the model, never a crash; the code the workers import
is in the resume fingerprint."""
import os
import time

import pytest

from fastrlhf.agents.envs import EnvPool
from fastrlhf.agents.step import MalformedStep, Step, as_step_dict
from fastrlhf.agents.tool_env import ToolEnvironment
from fastrlhf.errors import AgentError, ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
ENVS = os.path.join(HERE, "envs.py")


def env(name, timeout=20.0, workers=1):
    return EnvPool(f"{ENVS}:{name}", workers, timeout)


def drive(pool, actions, iid=0, wait=20.0):
    """Submit each action in turn and wait for its StepResult."""
    out = []
    for a in actions:
        pool.submit(iid, a)
        got = []
        end = time.monotonic() + wait
        while not got and time.monotonic() < end:
            got = pool.poll(0.2)
        out += [r for _, r in got]
    return out


def test_step_values_are_checked():
    assert as_step_dict(Step("o", 1, done=False)) == {"observation": "o", "reward": 1.0, "done": False}
    assert as_step_dict({"observation": None, "reward": None, "done": True})["done"] is True
    for bad, message in [(Step(5, 0.0, done=False), "non-string observation"),
                         ({"observation": "x", "reward": float("nan"), "done": False}, "nan reward"),
                         ({"observation": "x", "reward": 1.0}, "without 'done'"),
                         ({"observation": "x", "reward": "1", "done": False}, "non-number reward"),
                         ({"observaton": "x", "done": False}, "unknown keys"),
                         ({"done": "yes"}, "done must be True or False"),
                         (("x", 1.0, False), "returned a tuple")]:
        with pytest.raises(MalformedStep, match=message):
            as_step_dict(bad)
    with pytest.raises(TypeError):
        Step("no done")   # done is required


def test_an_environment_runs_in_workers_one_instance_per_trajectory():
    pool = env("Countdown", workers=2)
    try:
        firsts = pool.reset([0, 1, 2], ["p0", "p1", "p2"], [{"start": 5}, {"start": 2}, {}])
        assert firsts == ["count 5", "count 2", "count 3"]   # columns reach reset as keyword arguments
        assert {w.proc.pid for w in pool.workers} and len(pool.workers) == 2
        for iid in (0, 1, 2):
            pool.submit(iid, "go")
        got = {}
        while len(got) < 3:
            got.update(pool.poll(1.0))
        assert [got[i].messages for i in (0, 1, 2)] == [[("user", "left 4")], [("user", "left 1")], [("user", "left 2")]]
        assert got[0].reward == 0.5 and not got[0].done
        assert pool.workers[0].proc.pid != os.getpid()
    finally:
        pool.shutdown()


@pytest.mark.parametrize("name, message", [
    ("Misspelled", r"class Misspelled has no method step\(\) \(it has 'stepp': misspelled\?\)"),
    ("NoReset", r"class NoReset has no method reset\(\)"),
    ("NeedsArgs", r"NeedsArgs\(\) raised TypeError: .*constructed without arguments"),
    ("NotThere", r"envs.py has no class 'NotThere'; it defines"),
])
def test_bad_environment_classes_are_refused_at_startup_naming_them(name, message):
    with pytest.raises(ConfigError, match=message):
        env(name)


def test_a_missing_env_module_or_file_is_refused():
    with pytest.raises(ConfigError, match="no module named 'no_such_env_module'"):
        EnvPool("no_such_env_module:Env")
    with pytest.raises(ConfigError, match="the file .*missing_env.py does not exist"):
        EnvPool("missing_env.py:Env")


@pytest.mark.parametrize("name, message", [
    ("Raises", r"environment Raises raised KeyError: 'no such move' \(at envs.py:\d+\) in step\(\) on the prompt "
               r"'the prompt'; the run stopped before this step's update"),
    ("IntObservation", r"environment IntObservation step\(\) returned a non-string observation \(int 5\).*"
                       r"\(prompt 'the prompt'\)"),
    ("NaNReward", r"returned a nan reward.*\(prompt 'the prompt'\)"),
    ("NoDone", r"returned a dict without 'done'"),
])
def test_a_failing_or_malformed_step_stops_the_run_with_one_line(name, message):
    pool = env(name)
    try:
        pool.reset([0], ["the prompt"], [{}])
        with pytest.raises(AgentError, match=message) as e:
            drive(pool, ["move"])
        assert "\n" not in str(e.value)
    finally:
        pool.shutdown()


def test_a_reset_that_returns_a_non_string_is_refused():
    pool = env("BadReset")
    try:
        with pytest.raises(AgentError, match=r"reset\(\) returned a int \(42\)"):
            pool.reset([0], ["p"], [{}])
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_a_step_that_hangs_is_stopped_at_the_env_timeout():
    pool = env("Hangs", timeout=1.0)
    try:
        pool.reset([0], ["the prompt"], [{}])
        t0 = time.monotonic()
        with pytest.raises(AgentError, match=r"environment Hangs did not return from step\(\) within --env_timeout 1s "
                                             r"\(prompt 'the prompt'\); its worker was stopped"):
            drive(pool, ["move"])
        assert time.monotonic() - t0 < 10
        assert pool.workers[0].proc is None   # killed; a later request starts a fresh worker
    finally:
        pool.shutdown()


@pytest.fixture(scope="module")
def tools():
    t = ToolEnvironment([f"{ENVS}:add", f"{ENVS}:shout", f"{ENVS}:fails", f"{ENVS}:sleeps"], timeout=2.0)
    yield t
    t.shutdown()


def test_tools_are_described_by_their_schemas(tools):
    names = [s["function"]["name"] for s in tools.tool_schemas]
    assert names == ["add", "shout", "fails", "sleeps"]
    add = tools.tool_schemas[0]["function"]
    assert add["description"] == "Add two integers."
    assert add["parameters"] == {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "description": "the first."}, "b": {"type": "integer", "description": "the second."}}}
    assert tools.tool_schemas[1]["function"]["parameters"]["required"] == ["text"]


def call(tools, text, iid=0):
    tools.submit(iid, text)
    got = []
    end = time.monotonic() + 30
    while not got and time.monotonic() < end:
        got = tools.poll(0.2)
    assert len(got) == 1 and got[0][0] == iid
    return got[0][1]


def test_tool_calls_are_run_and_answered(tools):
    r = call(tools, 'I will add. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}</tool_call>'
                    '<tool_call>{"name": "shout", "arguments": {"text": "hi", "times": 2}}</tool_call>')
    assert r.messages == [("tool", "42"), ("tool", "HI HI")]
    assert (r.tool_calls, r.tool_errors, r.done, r.reward) == (2, 0, False, None)
    assert call(tools, "The answer is 42.").done   # a turn without a tool call ends the trajectory


@pytest.mark.parametrize("text, answer", [
    ('<tool_call>{"name": "mul", "arguments": {}}</tool_call>', "error: there is no tool 'mul'; the tools are add, "),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}</tool_call>', "error: the tool call is not valid JSON"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "c": 2}}</tool_call>', "error: add has no parameter 'c'"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "error: add needs the argument(s) 'b'"),
    ('<tool_call>{"name": "add", "arguments": {"a": "1", "b": 2}}</tool_call>', "error: argument 'a' of add must be "
                                                                                 "a integer"),
    ('<tool_call>{"name": "fails", "arguments": {"x": "y"}}</tool_call>', "error: fails raised RuntimeError: tool broke"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', "error: the tool call has no closing"),
])
def test_a_bad_tool_call_is_answered_with_an_error_for_the_model(tools, text, answer):
    r = call(tools, text)
    assert len(r.messages) == 1 and r.messages[0][1].startswith(answer), r.messages
    assert (r.tool_calls, r.tool_errors, r.done) == (1, 1, False)


@pytest.mark.timeout(120)
def test_a_tool_that_times_out_is_answered_and_its_worker_restarted(tools):
    r = call(tools, '<tool_call>{"name": "sleeps", "arguments": {"seconds": 30}}</tool_call>'
                    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}</tool_call>')
    assert r.messages == [("tool", "error: the tool sleeps did not answer within 2s"), ("tool", "2")]
    assert call(tools, '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>').messages == [("tool", "7")]


@pytest.mark.parametrize("specs, message", [
    ([f"{ENVS}:no_hints"], r"tool no_hints: parameter 'x' has no type hint"),
    ([f"{ENVS}:no_doc"], r"tool no_doc has no docstring"),
    ([f"{ENVS}:add", f"{HERE}/other/dup.py:add"], r"--tools: two tools are named 'add'"),
    ([f"{ENVS}:Echo"], r"Echo is a class; a tool is a function"),
])
def test_bad_tools_are_refused_at_startup_naming_them(specs, message):
    with pytest.raises(ConfigError, match=message):
        ToolEnvironment(specs)


def test_editing_an_environment_or_a_tool_is_another_run(tmp_path, monkeypatch):
    """The environment's and the tools' code is in the resume fingerprint (as the reward functions'
    is): a run resumed after editing one would train against other rules than its checkpoint's."""
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.fingerprint import fingerprint_diff, run_fingerprint
    monkeypatch.chdir(tmp_path)
    env = "class Env:\n    def reset(self, prompt, **c):\n        return None\n    def step(self, action):\n" \
          "        return {'observation': None, 'reward': %s, 'done': True}\n"
    tool = 'def lookup(key: str) -> str:\n    """Look a key up."""\n    return %r\n'
    (tmp_path / "my_env.py").write_text(env % "1.0")
    (tmp_path / "my_tools.py").write_text(tool % "a")
    for cfg, path, text, what in (
            (PPOConfig(env="my_env.py:Env"), "my_env.py", env % "2.0", "environment my_env.py:Env"),
            (PPOConfig(tools=["my_tools:lookup", "fastrlhf.agents:calculator"], reward_fn=[f"{ENVS}:length_reward"]),
             "my_tools.py", tool % "b", "tool my_tools:lookup")):
        saved = run_fingerprint(cfg, "ppo")
        assert fingerprint_diff(saved, run_fingerprint(cfg, "ppo")) == []
        (tmp_path / path).write_text(text)
        assert fingerprint_diff(saved, run_fingerprint(cfg, "ppo")) == [f"the code of the {what} changed"]

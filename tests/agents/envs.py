"""Environments and tools the agent tests load by spec (in worker processes)."""
import time

from fastrlhf.agents import Step


class Echo:
    """Answers each turn with its text reversed; done after `turns` turns; reward = turn count."""
    turns = 2

    def reset(self, prompt, **columns):
        self.n = 0
        self.columns = columns
        return None

    def step(self, action):
        self.n += 1
        done = self.n >= self.turns
        return Step(observation=None if done else f"obs{self.n}", reward=float(self.n), done=done)


class Countdown:
    """First message from the row; observations count down; never says done."""

    def reset(self, prompt, start=3, **columns):
        self.left = int(start)
        return f"count {self.left}"

    def step(self, action):
        self.left -= 1
        return {"observation": f"left {self.left}", "reward": 0.5, "done": False}


class LongObservation:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        return Step(" ".join(["word"] * 500), 0.0, done=False)


class Misspelled:
    def reset(self, prompt, **columns):
        return None

    def stepp(self, action):
        return Step(None, 0.0, done=True)


class NoReset:
    def step(self, action):
        return Step(None, 0.0, done=True)


class NeedsArgs:
    def __init__(self, size):
        self.size = size

    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        return Step(None, 0.0, done=True)


class Raises:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        raise KeyError("no such move")


class Hangs:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        time.sleep(600)


class IntObservation:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        return Step(5, 0.0, done=False)


class NaNReward:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        return {"observation": "x", "reward": float("nan"), "done": False}


class NoDone:
    def reset(self, prompt, **columns):
        return None

    def step(self, action):
        return {"observation": "x", "reward": 1.0}


class BadReset:
    def reset(self, prompt, **columns):
        return 42

    def step(self, action):
        return Step(None, 0.0, done=True)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


def shout(text: str, times: int = 1) -> str:
    """Upper-case a text, repeated."""
    return " ".join([text.upper()] * times)


def fails(x: str) -> str:
    """Always raises."""
    raise RuntimeError("tool broke")


def sleeps(seconds: float) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return "woke"


def no_hints(x) -> str:
    """A parameter without a type hint."""
    return x


def no_doc(x: str) -> str:
    return x


class HigherLower:
    """Says "higher" or "lower" to the number in the model's turn (any text: a random model);
    done on the 3rd turn, or when it sees `stop_word`."""

    def reset(self, prompt, delay=0.0, **columns):
        self.n, self.delay = 0, float(delay)
        return None

    def step(self, action):
        self.n += 1
        if self.delay and self.n == 1:
            time.sleep(self.delay)
        done = self.n >= 3
        return Step(None if done else ("higher" if self.n % 2 else "too low , guess again"), 1.0 / self.n, done=done)


def length_reward(prompts, completions, **columns):
    """A reward function that varies between answers (for tests that need reward differences)."""
    return [len(c) / 100.0 for c in completions]

"""Reward functions for the reward-source tests, loaded by path (`tests/rewards/fns.py:NAME`)
in worker processes, like a user's file."""
import math
import time


def length_and_answer(prompts, completions, answer=None, **columns):
    print("a print from a reward function must not disturb the protocol")
    return [len(c) + (100.0 if a == c else 0.0) for c, a in zip(completions, answer)]


def none_for_empty(prompts, completions, **_):
    return [None if not c else 1.0 for c in completions]


def raises_on_bad(prompts, completions, **_):
    out = []
    for p, c in zip(prompts, completions):
        if "bad" in p:
            raise ZeroDivisionError("cannot score this one")
        out.append(1.0)
    return out


def wrong_length(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)


def gives_nan(prompts, completions, **_):
    return [math.nan] + [0.0] * (len(completions) - 1)


def gives_string(prompts, completions, **_):
    return ["1.0"] * len(completions)


def gives_scalar(prompts, completions, **_):
    return 1.0


def hangs(prompts, completions, **_):
    time.sleep(120)
    return [0.0] * len(completions)


not_a_function = 3


def none_for_all(prompts, completions, **_):
    return [None] * len(completions)


def none_for_odd_rows(prompts, completions, answer, **_):
    # needs the dataset's `answer` column: proves the columns reach the function
    return [None if i % 2 else float(c.strip().endswith(a)) for i, (c, a) in enumerate(zip(completions, answer))]


_calls = [0]


def raises_after_first_batch(prompts, completions, **_):
    _calls[0] += 1
    if _calls[0] > 1:
        raise ValueError(f"no score for {completions[0]!r}")
    return [0.5] * len(completions)


def forks_and_returns(prompts, completions, **_):
    """Forks a child that returns into the caller (as a careless multiprocessing setup can) and lives on."""
    import os
    if os.fork() == 0:
        return [-1.0] * len(completions)  # the child: a wrong answer, if it were ever read
    return [float(len(c)) for c in completions]


def slow_and_marked(prompts, completions, **_):
    """Writes a line to $REWARD_MARKER when called, then takes a while: a test signals while it runs."""
    import os
    marker = os.environ.get("REWARD_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write("call\n")
    time.sleep(float(os.environ.get("REWARD_SLEEP", "1.0")))
    return [float(len(c) % 3) for c in completions]


def huge(prompts, completions, **_):
    """Finite, within float32, and far too large for the value loss."""
    return [1e30 * (1 + len(c) % 2) for c in completions]


def beyond_float32(prompts, completions, **_):
    return [1e39] + [0.0] * (len(completions) - 1)

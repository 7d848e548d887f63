"""Reward functions for the DAPO tests (run in reward worker processes)."""


def thirds(prompts, completions, **columns):
    """1 for about a third of the completions (by a hash of the text), else 0: groups of two answers
    often agree (no learning signal), often not."""
    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]

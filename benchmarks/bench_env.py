"""The environment of benchmarks/rlhf.py's multi-turn presets: every model turn is answered with
the same fixed-length observation (a stand-in for a tool's answer) until the last allowed turn,
so a random-weight model gives trajectories of a known shape (turns x (answer + observation))."""
from fastrlhf.agents import Step

OBSERVATION_WORDS = 16   # words of each observation (one token each in the bundled tokenizer)
TURNS = 3


class FixedTurns:
    def reset(self, prompt, **columns):
        self.turn = 0
        return None

    def step(self, action):
        self.turn += 1
        if self.turn >= TURNS:
            return Step(None, float(len(action)) / 100.0, done=True)
        return Step(" ".join(["the"] * OBSERVATION_WORDS), 0.0, done=False)

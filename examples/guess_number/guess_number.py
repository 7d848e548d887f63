"""Guess the number: a multi-turn environment for `fastrlhf ppo --env` (README: "Multi-turn
rollouts: environments and tools").

The model guesses a secret whole number between 1 and `high`; after each guess the environment
answers "higher" or "lower"; a right guess ends the trajectory with reward 1 - 0.2 x (guesses - 1)
(finding it in few turns pays), a turn without a number is answered "say a number". A trajectory
that never finds it is cut by --max_turns with reward 0.

    fastrlhf grpo --model_name_or_path MY_SFT_MODEL --data.paths examples/guess_number/prompts.jsonl \\
        --env examples/guess_number/guess_number.py:GuessNumber --max_turns 5 --max_new_tokens 8

Each data row gives the prompt and the secret (`{"prompt": "guess my number between 1 and 20 .",
"secret": 13, "high": 20}`); regenerate prompts.jsonl with `python guess_number.py --rows 400`.
"""
import argparse
import json
import random
import re

from fastrlhf.agents import Step

NUMBER = re.compile(r"-?\d+")


class GuessNumber:
    def reset(self, prompt, secret=None, high=20, **columns):
        self.high = int(high)
        self.secret = int(secret) if secret is not None else random.randint(1, self.high)
        self.guesses = 0
        return None   # the dataset's prompt is the first message

    def step(self, action):
        numbers = NUMBER.findall(action)
        if not numbers:
            return Step("say a number", 0.0, done=False)
        self.guesses += 1
        guess = int(numbers[-1])
        if guess == self.secret:
            return Step(None, max(0.0, 1.0 - 0.2 * (self.guesses - 1)), done=True)
        return Step("higher" if guess < self.secret else "lower", 0.0, done=False)


def make_rows(n, seed=0, high=20):
    rng = random.Random(seed)
    return [{"prompt": f"guess my number between 1 and {high} .", "secret": rng.randint(1, high), "high": high}
            for _ in range(n)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the guess-the-number prompts")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="prompts.jsonl")
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for row in make_rows(args.rows, args.seed):
            f.write(json.dumps(row) + "\n")

"""Multi-turn rollouts: environments (`--env`) and tools (`--tools`) the model acts in over
several turns, token-in/token-out on the hybrid engine (docs/interfaces.md, "fastrlhf.agents").

    from fastrlhf.agents import Step

    class GuessNumber:                       # --env my_env.py:GuessNumber
        def reset(self, prompt, **columns):  # -> the first user message, or None to keep the prompt
            ...
        def step(self, action):              # -> Step(observation, reward, done=...)
            ...

Modules: `step` (Step and its checks), `tools` (schemas from type hints and docstrings, tool-call
parsing), `builtin` (`calculator`), `service` (the worker side), `envs` / `tool_env` (the trainer's
side), `render` (turns as text and tokens), `trajectory` (the token-level record and its tensors),
`rollout` (the driver on the engine's RolloutSession).
"""
from fastrlhf.agents.builtin import calculator
from fastrlhf.agents.step import Step

__all__ = ["Step", "calculator"]

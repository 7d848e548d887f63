"""Rewards computed by programs: built-in verifiable rewards, user reward functions run in
worker processes, HTTP reward servers, and their weighted mix with the step-2 reward model.

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

is the reward-function API (`columns` = the dataset's other columns for those rows, e.g.
`answer`; `None` = no reward for that sample, which is then left out of the loss). Built-ins,
usable as `--reward_fn fastrlhf.rewards:NAME`: `math_answer_match`, `arithmetic_reward`,
`format_reward` (think/answer tags; `make_format_reward(pattern)` for your own),
`length_penalty` (`make_length_penalty(max_words)`), `default_task_reward`, `calculator_reward`.
"""
from fastrlhf.rewards.builtin import (THINK_ANSWER, answers_match, arithmetic_reward, calculator_reward,
                                      default_task_reward, extract_answer, format_reward, length_penalty,
                                      make_format_reward, make_length_penalty, math_answer_match, parse_number)

__all__ = ["THINK_ANSWER", "answers_match", "arithmetic_reward", "calculator_reward", "default_task_reward",
           "extract_answer", "format_reward", "length_penalty", "make_format_reward", "make_length_penalty",
           "math_answer_match", "parse_number"]

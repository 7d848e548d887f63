"""The bundled tasks: small, exactly scored problems that run the whole pipeline on a laptop CPU
with no downloads.

- `default_task`: describe a topic in a happy or a sad tone (steps 1, 2 and 3; the exact
  `ground_truth_score` is logged beside the learned reward). Data, tokenizer and tiny model
  config in `tasks/default/`.
- `arithmetic_task`: one-step word problems (SFT, then GRPO on the exact-answer reward function,
  no reward model). Data, tokenizer and config in `tasks/arithmetic/`.
- `evaluation`: held-out pass@k with the hybrid engine; `registry.TASKS`: what `fastrlhf train
  --task NAME` runs (steps, profiles, evaluation); `learnability`: a plain-torch check that the
  tiny model learns the default task.

Each task module imports nothing from fastrlhf but the other tasks (the ground floor: models,
data and rewards read the default task's files from here); `evaluation` and `registry` sit above
the engine. This file imports nothing, so reading a task's files loads no model code.
"""

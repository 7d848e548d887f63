"""Step 3's side of multi-turn rollouts: the environment a PPOConfig names (`--env` or `--tools`),
trajectories for a PromptCollator batch as the tensors of a single-turn rollout, the environment's
rewards beside the other sources, and `rollouts.jsonl`."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch

from .rollout import AgentLimits, MultiTurnRollout
from .trajectory import Trajectory, rollout_log_record, to_rollout_tensors, trajectory_metrics

ENV_SOURCE = "env"


def make_environment(cfg):
    """The EnvPool (--env) or ToolEnvironment (--tools) of a config, its workers started."""
    if cfg.env:
        from .envs import EnvPool
        return EnvPool(cfg.env, cfg.env_workers, cfg.env_timeout)
    from .tool_env import ToolEnvironment
    return ToolEnvironment(cfg.tools, cfg.env_workers, cfg.env_timeout)


# (working dir, --env spec or --tools specs) -> the source files their workers imported, as the last
# check in this process found them
_checked_sources: Dict[tuple, List[Optional[str]]] = {}


def _source_key(cfg) -> tuple:
    from ..rewards.spec import absolute_spec
    specs = [cfg.env] if cfg.env else list(cfg.tools)
    return (os.getcwd(), "env" if cfg.env else "tools") + tuple(absolute_spec(s) for s in specs)


def check_agent_specs(cfg) -> None:
    """--env / --tools loaded and checked in their workers (ConfigError naming the problem), then
    stopped: before any model loads. Their source files are kept for `agent_source_files`."""
    if not (cfg.env or cfg.tools):
        return
    env = make_environment(cfg)
    try:
        _checked_sources[_source_key(cfg)] = [env.source] if cfg.env else list(env.sources)
    finally:
        env.shutdown()


def agent_source_files(cfg) -> List[Optional[str]]:
    """The source file of the --env class or of each --tools function (from this process's last
    check, else a new one): what a run's fingerprint hashes, so that editing an environment or a
    tool is a different run."""
    if _source_key(cfg) not in _checked_sources:
        check_agent_specs(cfg)
    return _checked_sources[_source_key(cfg)]


def agent_limits(cfg, max_new_tokens: int) -> AgentLimits:
    return AgentLimits(max_turns=cfg.max_turns, max_new_tokens=max_new_tokens,
                       max_observation_tokens=cfg.max_observation_tokens,
                       max_trajectory_tokens=cfg.max_trajectory_tokens, min_new_tokens=cfg.min_new_tokens)


def items_from_batch(batch: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The prompt items a PromptCollator batch was made from (prompt tokens without padding)."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].bool().cpu()
    columns = batch.get("columns") or {}
    messages = batch.get("prompt_messages")
    return [{"prompt_input_ids": ids[b][mask[b]].tolist(), "prompt": batch["prompt"][b],
             "columns": {k: v[b] for k, v in columns.items()},
             "prompt_messages": messages[b] if messages is not None else None} for b in range(ids.shape[0])]


class AgentRollouts:
    """Multi-turn rollouts of step 3 on the ExperienceMaker's engine."""

    def __init__(self, cfg, engine, tokenizer, max_new_tokens: int):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.env = make_environment(cfg)
        self.limits = agent_limits(cfg, max_new_tokens)
        self.driver = MultiTurnRollout(engine, tokenizer, self.env, self.limits, temperature=cfg.temperature,
                                       top_k=cfg.top_k, top_p=cfg.top_p)
        self.has_env_rewards = bool(cfg.env)

    @property
    def generation_budget(self) -> int:
        """Generated tokens a trajectory may hold (the constant of seq_mean_token_sum_norm)."""
        return min(self.limits.max_turns * self.limits.max_new_tokens, self.limits.trajectory_budget)

    def rollout(self, batch: Dict[str, Any], generator, device, group_size: int = 1) -> Dict[str, Any]:
        """{sequences, attention_mask, action_mask, engine_logprobs, turn_index, prompt_len} (on
        `device`), plus "trajectories", "truncated" [B * group_size] bool and "info" (metrics of the
        batch): `group_size` trajectories per prompt, adjacent (a group shares its prompt's KV)."""
        items = [it for it in items_from_batch(batch) for _ in range(max(group_size, 1))]
        trajs = self.driver.run(items, seeds=generator)
        out = to_rollout_tensors(trajs, self.tokenizer.pad_token_id, device)
        out["trajectories"] = trajs
        out["truncated"] = torch.tensor([t.cut in ("trajectory_tokens", "max_length") or
                                         (t.last_reason == "length" and not t.done) for t in trajs], device=device)
        info = trajectory_metrics(trajs)
        info.update(self.driver.timings)
        out["info"] = info
        return out

    def close(self) -> None:
        self.env.shutdown()


def add_env_rewards(result, total: Optional[List[Optional[float]]], trajs: List[Trajectory], has_env_rewards: bool):
    """The total reward with the environment's step rewards added (a source named "env", weight 1):
    -> (RewardResult or None, total). A trajectory the environment gave no reward gets 0 from it
    when other sources exist, else no reward at all (left out of the loss)."""
    from ..rewards.sources import RewardResult
    if not has_env_rewards:
        return result, total
    env = [t.env_reward for t in trajs]
    if total is None:
        new_total = env
    else:
        new_total = [None if t is None else t + (e or 0.0) for t, e in zip(total, env)]
    if result is None:
        result = RewardResult(new_total, {})
    result.per_source[ENV_SOURCE] = env
    result.total = new_total
    return result, new_total


class RolloutLog:
    """`--log_rollouts N`: N trajectories of each step to <output_dir>/rollouts.jsonl (appended)."""

    def __init__(self, output_dir: str, n: int):
        self.path, self.n = os.path.join(output_dir, "rollouts.jsonl"), int(n)

    def write(self, step: int, prompts: List[str], turns: List[List[Dict[str, Any]]],
              rewards: List[Optional[float]]) -> None:
        if self.n <= 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for prompt, t, r in list(zip(prompts, turns, rewards))[:self.n]:
                f.write(json.dumps(rollout_log_record(step, prompt, t, r), ensure_ascii=False) + "\n")

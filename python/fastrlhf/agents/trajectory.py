"""The token-level record of a trajectory, and the step-3 tensors made from a batch of them.

A trajectory is its prompt's tokens, then turns: the model's (tokens as sampled, EOS included,
with the engine's log-probs) and the environment's (text rendered and tokenized on its own).
`to_rollout_tensors` lays a batch out as single-turn rollouts are laid out: prompts left-padded to
P columns, then the trajectory tokens and right padding; `action_mask` is 1 on generated tokens
only, `attention_mask` on every real token, `turn_index` numbers the model's turns from 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class Trajectory:
    prompt: str                         # the rendered prompt text (what reward sources get)
    prompt_ids: List[int]
    columns: Dict[str, Any]
    tokens: List[int] = field(default_factory=list)       # after the prompt
    generated: List[bool] = field(default_factory=list)   # per token: sampled by the model
    logprobs: List[float] = field(default_factory=list)   # the engine's, 0.0 on environment tokens
    turn_of: List[int] = field(default_factory=list)      # model turn (from 1) of generated tokens, 0 else
    turns: List[Dict[str, Any]] = field(default_factory=list)  # {"role", "text", "trained"} in order
    step_rewards: List[float] = field(default_factory=list)
    n_turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    observation_tokens: int = 0
    observations_cut: int = 0
    done: bool = False                  # the environment said so
    cut: Optional[str] = None           # "max_turns", "trajectory_tokens", "max_length" (the model's positions)
    last_reason: Optional[str] = None   # why the model's last turn stopped ("eos", "length", ...)

    def add_model_turn(self, tokens: List[int], logprobs: Optional[List[float]], text: str) -> None:
        self.n_turns += 1
        self.tokens += tokens
        self.generated += [True] * len(tokens)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(tokens)
        self.turn_of += [self.n_turns] * len(tokens)
        self.turns.append({"role": "assistant", "text": text, "trained": True})

    def add_environment_turn(self, tokens: List[int], text: str) -> None:
        self.tokens += tokens
        self.generated += [False] * len(tokens)
        self.logprobs += [0.0] * len(tokens)
        self.turn_of += [0] * len(tokens)
        self.observation_tokens += len(tokens)
        self.turns.append({"role": "environment", "text": text, "trained": False})

    @property
    def env_reward(self) -> Optional[float]:
        """The sum of the step rewards, None when no step gave one."""
        return float(sum(self.step_rewards)) if self.step_rewards else None

    def completion_text(self, tokenizer) -> str:
        """Everything after the prompt, decoded: what reward sources score."""
        return tokenizer.decode(self.tokens, skip_special_tokens=True)


def to_rollout_tensors(trajs: List[Trajectory], pad_id: int, device=None) -> Dict[str, Any]:
    """{"sequences" [B, P + N], "attention_mask" [B, P + N] long, "action_mask" [B, N] float,
    "engine_logprobs" [B, N], "turn_index" [B, N] long, "prompt_len" P}."""
    P = max(len(t.prompt_ids) for t in trajs)
    N = max(1, max(len(t.tokens) for t in trajs))
    B = len(trajs)
    seq = torch.full((B, P + N), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + N, dtype=torch.long)
    action = torch.zeros(B, N)
    logp = torch.zeros(B, N)
    turn = torch.zeros(B, N, dtype=torch.long)
    for b, t in enumerate(trajs):
        p, n = len(t.prompt_ids), len(t.tokens)
        seq[b, P - p:P] = torch.tensor(t.prompt_ids, dtype=torch.long)
        attn[b, P - p:P + n] = 1
        if n:
            seq[b, P:P + n] = torch.tensor(t.tokens, dtype=torch.long)
            action[b, :n] = torch.tensor(t.generated, dtype=torch.float32)
            logp[b, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
            turn[b, :n] = torch.tensor(t.turn_of, dtype=torch.long)
    out = {"sequences": seq, "attention_mask": attn, "action_mask": action, "engine_logprobs": logp,
           "turn_index": turn, "prompt_len": P}
    return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in out.items()}


def trajectory_metrics(trajs: List[Trajectory]) -> Dict[str, float]:
    """Per-step metrics of a batch of trajectories (means per trajectory, counts over the batch)."""
    n = max(len(trajs), 1)
    return {"turns_mean": sum(t.n_turns for t in trajs) / n,
            "turns_max": float(max((t.n_turns for t in trajs), default=0)),
            "tool_calls": sum(t.tool_calls for t in trajs) / n,
            "tool_errors": sum(t.tool_errors for t in trajs) / n,
            "observation_tokens": sum(t.observation_tokens for t in trajs) / n,
            "observations_cut": float(sum(t.observations_cut for t in trajs)),
            "cut_max_turns": float(sum(t.cut == "max_turns" for t in trajs)),
            "cut_trajectory_tokens": float(sum(t.cut == "trajectory_tokens" for t in trajs)),
            "trajectory_tokens": sum(len(t.tokens) for t in trajs) / n}


def rollout_log_record(step: int, prompt: str, turns: List[Dict[str, Any]], reward: Optional[float]) -> Dict[str, Any]:
    """One line of rollouts.jsonl."""
    return {"step": int(step), "prompt": prompt,
            "turns": [{"role": t["role"], "text": t["text"], "trained": bool(t["trained"])} for t in turns],
            "reward": None if reward is None else float(reward)}

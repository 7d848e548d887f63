"""Multi-turn rollouts on the hybrid engine's continuation API (`engine.session()`).

Every trajectory is a live sequence of one `RolloutSession`: a model turn runs until EOS (or the
turn's token budget); its tokens go to the environment's worker as text while the session keeps
decoding the other sequences (a paused sequence holds no decode row); when the environment answers,
its turn is rendered, tokenized on its own and appended (`session.append`: only the new tokens
are computed), and the model's next turn starts. Nothing is re-tokenized: the trajectory is the
session's own tokens, checked against it when the sequence finishes.

Limits: `max_turns` model turns (a trajectory the environment has not ended by then is cut),
`max_new_tokens` per model turn, `max_observation_tokens` per environment turn (its text cut to
fit), `max_trajectory_tokens` after the prompt (and the model's positions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .envs import StepResult
from .render import TurnRenderer
from .trajectory import Trajectory


@dataclass
class AgentLimits:
    max_turns: int = 4
    max_new_tokens: int = 64               # one model turn
    max_observation_tokens: int = 256      # one environment turn
    max_trajectory_tokens: Optional[int] = None  # after the prompt; None: the turns' budgets summed
    min_new_tokens: int = 0

    @property
    def trajectory_budget(self) -> int:
        if self.max_trajectory_tokens is not None:
            return self.max_trajectory_tokens
        return self.max_turns * self.max_new_tokens + (self.max_turns - 1) * self.max_observation_tokens


def _as_list(ids) -> List[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class MultiTurnRollout:
    """Trajectories for a batch of step-3 prompt items (dicts with `prompt_input_ids`, `prompt`,
    `columns` and, when the data has them, `prompt_messages`), one environment instance each."""

    def __init__(self, engine, tokenizer, env, limits: AgentLimits, *, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.engine, self.tokenizer, self.env, self.limits = engine, tokenizer, env, limits
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.renderer = TurnRenderer(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.timings: Dict[str, float] = {}

    # ------------------------------------------------------------------ prompts

    def start_trajectories(self, items: Sequence[Dict[str, Any]]) -> List[Trajectory]:
        """Reset one environment instance per item (instance id = position); each trajectory's prompt."""
        prompts = [it["prompt"] for it in items]
        firsts = self.env.reset(list(range(len(items))), prompts, [dict(it.get("columns") or {}) for it in items])
        tools = self.env.tool_schemas
        trajs = []
        for it, first in zip(items, firsts):
            if first is None and not tools:
                text, ids = it["prompt"], _as_list(it["prompt_input_ids"])
            else:
                messages = [{"role": "user", "content": first}] if first is not None else it.get("prompt_messages")
                text = self.renderer.prompt_text(messages, it["prompt"], tools)
                ids = self.renderer.encode_prompt(text)
            trajs.append(Trajectory(text, ids, dict(it.get("columns") or {})))
        return trajs

    # ------------------------------------------------------------------ the loop

    def run(self, items: Sequence[Dict[str, Any]], seeds=None) -> List[Trajectory]:
        """The trajectories of `items` (in order); `seeds` as `engine.generate`'s `generator=`.
        Timings of the call in `self.timings` (time_generation, time_environment)."""
        t0 = time.perf_counter()
        trajs = self.start_trajectories(items)
        env_time, gen_time = time.perf_counter() - t0, 0.0
        ids = list(range(len(trajs)))
        try:
            with self.engine.session(eos_token_id=self.eos, return_logprobs=True, **self.sampling) as sess:
                self.sess, self.trajs = sess, trajs
                self.seq_of: Dict[int, int] = {}     # trajectory -> its sequence
                self.traj_of: Dict[int, int] = {}    # sequence -> trajectory
                self._start_all(seeds)
                while sess.busy or self.env.pending:
                    if sess.busy:
                        t = time.perf_counter()
                        ends = sess.step()
                        gen_time += time.perf_counter() - t
                        for end in ends:
                            self._on_turn_end(self.traj_of[end.seq_id], end)
                    t = time.perf_counter()
                    results = self.env.poll(0.0 if sess.busy else 0.05)
                    if not sess.busy:
                        env_time += time.perf_counter() - t
                    for iid, result in results:
                        self._on_step(iid, result)
        finally:
            self.env.close(ids)
            self.sess = None
        self.timings = {"time_generation": gen_time, "time_environment": env_time}
        return trajs

    def _start_all(self, seeds) -> None:
        """Consecutive trajectories with the same prompt tokens start as one group (the prompt is
        computed once, its KV blocks shared)."""
        trajs, i = self.trajs, 0
        while i < len(trajs):
            j = i + 1
            while j < len(trajs) and trajs[j].prompt_ids == trajs[i].prompt_ids:
                j += 1
            budget = self._turn_budget(trajs[i])
            seq_ids = self.sess.start([trajs[i].prompt_ids], max_new_tokens=budget,
                                      min_new_tokens=min(self.limits.min_new_tokens, budget),
                                      num_return_sequences=j - i, seeds=seeds)
            for k, seq_id in zip(range(i, j), seq_ids):
                self.seq_of[k], self.traj_of[seq_id] = seq_id, k
            i = j

    def _room(self, traj: Trajectory) -> int:
        """Tokens the trajectory may still add (its budget and the model's positions)."""
        by_budget = self.limits.trajectory_budget - len(traj.tokens)
        by_positions = self.sess.max_len - 1 - len(traj.prompt_ids) - len(traj.tokens)
        return min(by_budget, by_positions)

    def _turn_budget(self, traj: Trajectory) -> int:
        return max(1, min(self.limits.max_new_tokens, self._room(traj)))

    def _on_turn_end(self, k: int, end) -> None:
        traj = self.trajs[k]
        text = self.tokenizer.decode(end.tokens, skip_special_tokens=True)
        traj.add_model_turn(list(end.tokens), end.logprobs, text)
        traj.last_reason = end.reason
        if end.reason == "max_length":
            traj.cut = "max_length"
        self.env.submit(k, text)   # every turn reaches the environment (its reward may depend on it)

    def _on_step(self, k: int, result: StepResult) -> None:
        traj = self.trajs[k]
        if result.reward is not None:
            traj.step_rewards.append(result.reward)
        traj.tool_calls += result.tool_calls
        traj.tool_errors += result.tool_errors
        if result.done:
            traj.done = True
            return self._finish(k)
        if traj.cut is not None:
            return self._finish(k)
        if traj.n_turns >= self.limits.max_turns:
            traj.cut = "max_turns"
            return self._finish(k)
        room = self._room(traj)
        ids, was_cut = self.renderer.turn_ids(result.messages, traj.last_reason == "eos",
                                              min(self.limits.max_observation_tokens, room - 1))
        traj.observations_cut += int(was_cut)
        if ids is None or room - len(ids) < 1:
            traj.cut = "trajectory_tokens"
            return self._finish(k)
        traj.add_environment_turn(ids, self.tokenizer.decode(ids, skip_special_tokens=True))
        budget = self._turn_budget(traj)
        self.sess.append(self.seq_of[k], ids, max_new_tokens=budget,
                         min_new_tokens=min(self.limits.min_new_tokens, budget))

    def _finish(self, k: int) -> None:
        traj = self.trajs[k]
        state = self.sess.finish(self.seq_of[k])
        p = len(traj.prompt_ids)
        if state.tokens[p:] != traj.tokens or state.generated_mask[p:] != traj.generated:
            raise RuntimeError(f"internal error: trajectory {k}'s record differs from its engine sequence")

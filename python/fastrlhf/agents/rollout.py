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

Where the engine has no sessions (under tensor parallelism, or with ZeRO-3 gathering layer by
layer on several ranks, where ranks must step together) the rollout goes turn by turn
(`_run_turn_by_turn`): all processes generate the next turn of their live trajectories together
with `engine.generate` on the tokens so far (the prefix is recomputed each turn), and the
environments answer in between. The trajectories are the same tokens; only the compute differs.
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


def has_sessions(engine) -> bool:
    """Whether the rollout can keep its trajectories in one `engine.session()`: not under tensor
    parallelism (no sessions there), nor where the engine's ranks must step together (ZeRO-3
    gathering layer by layer on several ranks: a rank waiting for its environments would not)."""
    if not hasattr(engine, "session") or getattr(engine, "tp", None) is not None:
        return False
    if getattr(getattr(engine, "config", None), "zero3_gather", "all") == "layer":
        from ..utils.distributed import get_world_size
        return get_world_size() == 1
    return True


def _as_list(ids) -> List[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class MultiTurnRollout:
    """Trajectories for a batch of step-3 prompt items (dicts with `prompt_input_ids`, `prompt`,
    `columns` and, when the data has them, `prompt_messages`), one environment instance each."""

    def __init__(self, engine, tokenizer, env, limits: AgentLimits, *, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, turn_by_turn: Optional[bool] = None):
        self.engine, self.tokenizer, self.env, self.limits = engine, tokenizer, env, limits
        # None: turn by turn only where the engine has no rollout sessions (tensor parallelism)
        self.turn_by_turn = not has_sessions(engine) if turn_by_turn is None else turn_by_turn
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
        self.trajs = self.start_trajectories(items)
        self._env_time, self._gen_time = time.perf_counter() - t0, 0.0
        try:
            if self.turn_by_turn:
                self._run_turn_by_turn(seeds)
            else:
                self._run_session(seeds)
        finally:
            self.env.close(list(range(len(self.trajs))))
            self.sess = None
        self.timings = {"time_generation": self._gen_time, "time_environment": self._env_time}
        return self.trajs

    def _poll_env(self, busy: bool):
        t = time.perf_counter()
        results = self.env.poll(0.0 if busy else 0.05)
        if not busy:
            self._env_time += time.perf_counter() - t
        return results

    def _run_session(self, seeds) -> None:
        """Every trajectory a live sequence of one RolloutSession (see the module docstring)."""
        with self.engine.session(eos_token_id=self.eos, return_logprobs=True, **self.sampling) as sess:
            self.sess, self.max_len = sess, sess.max_len
            self.seq_of: Dict[int, int] = {}     # trajectory -> its sequence
            self.traj_of: Dict[int, int] = {}    # sequence -> trajectory
            self._start_all(seeds)
            while sess.busy or self.env.pending:
                if sess.busy:
                    t = time.perf_counter()
                    ends = sess.step()
                    self._gen_time += time.perf_counter() - t
                    for end in ends:
                        self._on_turn_end(self.traj_of[end.seq_id], list(end.tokens), end.logprobs, end.reason)
                for k, result in self._poll_env(sess.busy):
                    ids = self._after_step(k, result)
                    if ids is None:
                        self._finish(k)
                    else:
                        budget = self._turn_budget(self.trajs[k])
                        sess.append(self.seq_of[k], ids, max_new_tokens=budget,
                                    min_new_tokens=min(self.limits.min_new_tokens, budget))

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

    def _finish(self, k: int) -> None:
        traj = self.trajs[k]
        state = self.sess.finish(self.seq_of[k])
        p = len(traj.prompt_ids)
        if state.tokens[p:] != traj.tokens or state.generated_mask[p:] != traj.generated:
            raise RuntimeError(f"internal error: trajectory {k}'s record differs from its engine sequence")

    def _run_turn_by_turn(self, seeds) -> None:
        """Under tensor parallelism (the engine's sessions do not run there yet): every process
        generates the next turn of all its live trajectories with `engine.generate` on their tokens
        so far (each turn recomputes the conversation's prefix: the same tokens, more compute),
        all processes together until none has a live trajectory; the environments answer in between."""
        from ..utils.distributed import all_ranks_true
        self.max_len = self.engine.spec.max_positions
        live = list(range(len(self.trajs)))
        while not all_ranks_true(not live):
            contexts = [self.trajs[k].prompt_ids + self.trajs[k].tokens for k in live] or [[self.eos]]
            t = time.perf_counter()
            new, logprobs = self._generate(contexts, seeds)
            self._gen_time += time.perf_counter() - t
            for k, tokens, lps in zip(live, new, logprobs):
                budget = self._turn_budget(self.trajs[k])
                cut = tokens[:budget]
                reason = "eos" if cut and cut[-1] == self.eos else "length"
                self._on_turn_end(k, cut, lps[:len(cut)], reason)
            ended = set()
            while self.env.pending:
                for k, result in self._poll_env(False):
                    ids = self._after_step(k, result)
                    if ids is None:
                        ended.add(k)
            live = [k for k in live if k not in ended]

    def _generate(self, contexts: List[List[int]], seeds):
        """One turn of every context (left-padded batch): new tokens up to and including EOS, and
        their log-probs."""
        import torch
        pad = self.tokenizer.pad_token_id
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(contexts):
            ids[i, width - len(c):], mask[i, width - len(c):] = torch.tensor(c), 1
        device = self.engine.device
        out = self.engine.generate(ids.to(device), mask.to(device), max_new_tokens=self.limits.max_new_tokens,
                                   min_new_tokens=self.limits.min_new_tokens, eos_token_id=self.eos, pad_token_id=pad,
                                   generator=seeds, return_logprobs=True, **self.sampling)
        new, lps = [], []
        for row, lp in zip(out.sequences[:, width:].tolist(), out.logprobs.tolist()):
            n = row.index(self.eos) + 1 if self.eos in row else len(row)
            new.append(row[:n])
            lps.append(lp[:n])
        return new, lps

    # ------------------------------------------------------------------ turns

    def _room(self, traj: Trajectory) -> int:
        """Tokens the trajectory may still add (its budget and the model's positions)."""
        by_budget = self.limits.trajectory_budget - len(traj.tokens)
        by_positions = self.max_len - 1 - len(traj.prompt_ids) - len(traj.tokens)
        return min(by_budget, by_positions)

    def _turn_budget(self, traj: Trajectory) -> int:
        return max(1, min(self.limits.max_new_tokens, self._room(traj)))

    def _on_turn_end(self, k: int, tokens: List[int], logprobs, reason: str) -> None:
        traj = self.trajs[k]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        traj.add_model_turn(tokens, logprobs, text)
        traj.last_reason = reason
        if reason == "max_length":
            traj.cut = "max_length"
        self.env.submit(k, text)   # every turn reaches the environment (its reward may depend on it)

    def _after_step(self, k: int, result: StepResult) -> Optional[List[int]]:
        """Record the environment's answer to trajectory k's last turn; the tokens of its next
        environment turn, or None when the trajectory ends here."""
        traj = self.trajs[k]
        if result.reward is not None:
            traj.step_rewards.append(result.reward)
        traj.tool_calls += result.tool_calls
        traj.tool_errors += result.tool_errors
        if result.done:
            traj.done = True
            return None
        if traj.cut is not None:
            return None
        if traj.n_turns >= self.limits.max_turns:
            traj.cut = "max_turns"
            return None
        room = self._room(traj)
        ids, was_cut = self.renderer.turn_ids(result.messages, traj.last_reason == "eos",
                                              min(self.limits.max_observation_tokens, room - 1))
        traj.observations_cut += int(was_cut)
        if ids is None or room - len(ids) < 1:
            traj.cut = "trajectory_tokens"
            return None
        traj.add_environment_turn(ids, self.tokenizer.decode(ids, skip_special_tokens=True))
        return ids

"""The continuation API: sequences that generate, stop, take appended tokens and go on.

    with engine.session(do_sample=True, temperature=1.0, eos_token_id=eos) as sess:
        ids = sess.start(prompts, max_new_tokens=64, stop=["</tool_call>"], num_return_sequences=4)
        for end in sess.run():                 # TurnEnd: seq_id, tokens, logprobs, reason
            ...                                # e.g. hand end.tokens to a tool
        sess.append(ids[0], tool_answer_ids, max_new_tokens=64)   # continues from the cache
        sess.run([ids[0]])
        seq = sess.sequence(ids[0])            # tokens, kinds (prompt/generated/appended), logprobs
        sess.finish(ids[0])                    # frees its blocks

A sequence is *generating* (queued or decoding), *paused* (its turn ended; it keeps its KV
blocks, so an append computes only the new tokens) or *finished* (blocks freed). `step()` runs
one window (one decode step per generating sequence, several on a GPU; its first step also
computes the new tokens of sequences that (re)join, packed beside the decode rows) and returns the turns that ended in it, so a caller waiting for
environments keeps calling `step()` for the others: a paused sequence holds no decode row.
Under memory pressure paused sequences lose their blocks first (then recomputed on append).

`HybridEngine.generate` is this with every sequence finishing at its first stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence as Seq, Union

import torch

from .kv_cache import blocks_for
from .scheduler import (APPENDED, FINISHED, GENERATED, PAUSED, PROMPT, RUNNING, Scheduler, Sequence,
                        make_turn, stop_reason)
from .sampling import SamplingParams, seed_key, sequence_seeds


@dataclass
class TurnEnd:
    """A sequence stopped generating: the tokens of this turn (stop token included), their
    log-probs (None unless asked) and why: "eos", "stop" (a stop token or string), "length"
    (max_new_tokens) or "max_length" (the model's positions)."""
    seq_id: int
    tokens: List[int]
    logprobs: Optional[List[float]]
    reason: str


@dataclass
class SequenceState:
    """A snapshot of one sequence: every token, what each is (`kinds`: PROMPT, GENERATED,
    APPENDED), the log-prob of each generated token (None elsewhere), status and last stop."""
    seq_id: int
    tokens: List[int]
    kinds: List[int]
    logprobs: List[Optional[float]]
    status: str
    stop_reason: Optional[str]

    @property
    def generated_mask(self) -> List[bool]:
        return [k == GENERATED for k in self.kinds]


class RolloutSession:
    """Sequences on one engine's paged KV cache (see the module doc). Create with
    `HybridEngine.session(...)`; the engine stays in inference mode until `close()`."""

    def __init__(self, engine, params: SamplingParams, eos_ids: List[int], want_logprobs: bool,
                 keep_on_stop: bool, max_len: int, lockstep=None):
        from .loop import Runner
        cfg = engine.config
        self.engine, self.params, self.keep = engine, params, keep_on_stop
        self.eos = frozenset(eos_ids)
        self.want_lp = want_logprobs
        self.max_len = max_len
        self.window = 1 if engine.device.type == "cpu" else cfg.stop_check_every
        self._entered = not engine.in_inference
        if self._entered:
            engine.eval()
        self._lockstep = lockstep
        self.scheduler = Scheduler(engine._pool(), cfg.kv_block_size, cfg.max_batch_size,
                                   cfg.continuous_batching)
        use_graphs = (cfg.cuda_graphs and engine.device.type == "cuda" and engine._weights.layer_iter is None)
        self.runner = Runner(engine, params, eos_ids, want_logprobs, max_len, self.window, use_graphs,
                             lockstep is not None)
        self.runner.set_max_blocks(blocks_for(max_len + self.window, cfg.kv_block_size))
        self.seqs: Dict[int, Sequence] = {}
        self._forks: Dict[int, List[Sequence]] = {}
        self._next_id = 0
        self.closed = False
        self.steps = 0

    # -- starting and continuing -----------------------------------------------------------------
    def start(self, prompts: Union[Seq[int], Seq[Seq[int]]], *, max_new_tokens: int, min_new_tokens: int = 0,
              stop=None, num_return_sequences: int = 1, seeds=None) -> List[int]:
        """Queue one sequence per prompt and answer (prompt b's answers are ids b*G .. b*G+G-1,
        G = num_return_sequences; its prompt is computed once and shared). `seeds`: as
        `generate`'s `generator=` (an int, one int per returned sequence, a torch.Generator,
        None). Returns the new sequences' ids."""
        self._check_open()
        prompts = _as_prompts(prompts)
        g = _check_group(num_return_sequences)
        self._check_turn(max_new_tokens, min_new_tokens)
        self._check_stop_strings(make_turn(max_new_tokens, min_new_tokens, stop, 0))
        for p in prompts:
            self._check_fits(len(p), max_new_tokens, "prompt")
        seed_list = sequence_seeds(seeds, len(prompts) * g, self.engine.device)
        return self._start(prompts, max_new_tokens, min_new_tokens, stop, g, seed_list, [0] * len(prompts))

    def _start(self, prompts: List[List[int]], max_new_tokens: int, min_new_tokens: int, stop, g: int,
               seed_list: List[int], owners: List[int]) -> List[int]:
        """start() after its checks; `owners`: the rank of each prompt (tensor parallelism)."""
        ids = []
        for b, prompt in enumerate(prompts):
            leader = None
            for j in range(g):
                turn = make_turn(max_new_tokens, min_new_tokens, stop, len(prompt))
                seq = Sequence(self._next_id, list(prompt), bytearray([PROMPT]) * len(prompt),
                               [0.0] * len(prompt), seed_list[b * g + j], turn, self.max_len, owner=owners[b],
                               key=seed_key(seed_list[b * g + j]))
                self._next_id += 1
                if leader is None:
                    leader = seq
                elif len(prompt) > 1:
                    seq.fork_of = leader
                    self._forks.setdefault(leader.seq_id, []).append(seq)
                self.seqs[seq.seq_id] = seq
                self.scheduler.add(seq)
                ids.append(seq.seq_id)
        return ids

    def append(self, seq_id: int, tokens: Seq[int], *, max_new_tokens: int, min_new_tokens: int = 0,
               stop=None) -> None:
        """Append `tokens` (e.g. a tool's answer, tokenized on its own) to a paused sequence and let
        it generate again; only the new tokens (and its last sampled one) are computed."""
        self._check_open()
        seq = self._get(seq_id)
        if seq.status == FINISHED:
            raise ValueError(f"sequence {seq_id} is finished (its blocks are freed); only a paused sequence "
                             "takes appended tokens")
        if seq.status != PAUSED:
            raise ValueError(f"sequence {seq_id} is still generating; append after its turn ends (step()/run() "
                             "return a TurnEnd for it)")
        tokens = _as_token_list(tokens, "appended tokens")
        if len(seq.tokens) + len(tokens) >= self.max_len:
            raise ValueError(f"appending {len(tokens)} tokens to sequence {seq_id} ({len(seq.tokens)} tokens) "
                             f"reaches the model's maximum position ({self.max_len}); no room to generate")
        self._check_turn(max_new_tokens, min_new_tokens)
        self._check_fits(len(seq.tokens) + len(tokens), max_new_tokens, "sequence")
        turn = make_turn(max_new_tokens, min_new_tokens, stop, len(seq.tokens) + len(tokens))
        self._check_stop_strings(turn)
        seq.tokens += tokens
        seq.kinds += bytearray([APPENDED]) * len(tokens)
        seq.logprobs += [0.0] * len(tokens)
        seq.turn, seq.stop_reason = turn, None
        self.runner.forget(seq_id)  # repetition-penalty state is rebuilt from all tokens
        self.scheduler.resume(seq)

    # -- running ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Some sequence is queued or decoding."""
        return self.scheduler.busy

    def step(self) -> List[TurnEnd]:
        """One window of work; the turns that ended in it."""
        self._check_open()
        sched, runner = self.scheduler, self.runner
        extend, decode, companions, copies = sched.schedule(self.window)
        self.engine._cache.copy_blocks(copies)
        ends: List[TurnEnd] = []
        steps = self.window
        if extend or self._any_rank(bool(extend)):  # the window's first step also admits
            extending = {id(s) for s in extend}
            joining = {id(s) for s in companions}
            rows = extend + decode + companions
            for seq, (tok, lp) in zip(rows, runner.packed(extend, decode, companions)):
                if id(seq) in extending:
                    sched.on_cached(seq, self._forks.pop(seq.seq_id, []))
                elif id(seq) in joining:
                    seq.fork_of = None  # its prompt is cached now (its source's blocks)
                else:
                    seq.num_cached += 1
                end = self._accept(seq, tok, lp)
                if end is not None:
                    ends.append(end)
            # companions sit out this window's other steps: their first write may need a copy of
            # a block their source wrote in this step (copies happen between windows)
            decode = [s for s in extend + decode if s.status == RUNNING]
            steps -= 1
        if steps and (decode or self._any_rank(bool(decode))):
            start = {id(s): s.num_cached for s in decode}
            results = runner.decode(decode, steps)
            for i, seq in enumerate(decode):
                for t, step in enumerate(results):
                    seq.num_cached = start[id(seq)] + t + 1
                    end = self._accept(seq, *step[i])
                    if end is not None:
                        ends.append(end)
                        break
        self.steps += 1
        return ends

    def run(self, seq_ids: Optional[Iterable[int]] = None) -> List[TurnEnd]:
        """Step until the given sequences (default: all) stop generating; their and any other
        ended turns, in order."""
        watch = None if seq_ids is None else [self._get(i) for i in seq_ids]
        ends: List[TurnEnd] = []
        while True:
            if watch is None:
                idle = not self.scheduler.busy
            else:
                idle = all(s.status in (PAUSED, FINISHED) for s in watch)
            if self._lockstep is not None:
                idle = self._lockstep(idle)
            if idle:
                return ends
            ends += self.step()

    def _any_rank(self, flag: bool) -> bool:
        return self._lockstep is not None and not self._lockstep(not flag)

    def _accept(self, seq: Sequence, tok: int, lp: float) -> Optional[TurnEnd]:
        seq.tokens.append(tok)
        seq.kinds.append(GENERATED)
        seq.logprobs.append(lp)
        reason = stop_reason(seq, self.eos, self._text_tail)
        if reason is None:
            return None
        self.scheduler.stop(seq, reason, keep=self.keep)
        if not self.keep:
            self.runner.forget(seq.seq_id)
        turn = slice(seq.turn.start, None)
        return TurnEnd(seq.seq_id, seq.tokens[turn], seq.logprobs[turn] if self.want_lp else None, reason)

    def _text_tail(self, seq: Sequence, n_chars: int) -> str:
        start = max(seq.turn.start, len(seq.tokens) - n_chars - 4)
        return self.engine.tokenizer.decode(seq.tokens[start:])

    # -- reading and ending ----------------------------------------------------------------------
    def sequence(self, seq_id: int) -> SequenceState:
        seq = self._get(seq_id)
        lps = [lp if k == GENERATED and self.want_lp else None for k, lp in zip(seq.kinds, seq.logprobs)]
        return SequenceState(seq.seq_id, list(seq.tokens), list(seq.kinds), lps, seq.status, seq.stop_reason)

    def finish(self, seq_id: int) -> SequenceState:
        """End a sequence (paused, or still generating: cancelled) and free its blocks."""
        seq = self._get(seq_id)
        if seq.status != FINISHED:
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            self.scheduler.release(seq)
            self.runner.forget(seq_id)
        return self.sequence(seq_id)

    def close(self) -> None:
        """Free every sequence's blocks; leave inference mode if the session entered it."""
        if self.closed:
            return
        for seq_id in list(self.seqs):
            self.finish(seq_id)
        self.closed = True
        if self._entered:
            self.engine.train()

    def __enter__(self) -> "RolloutSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checks ----------------------------------------------------------------------------------
    def _get(self, seq_id: int) -> Sequence:
        seq = self.seqs.get(seq_id) if isinstance(seq_id, int) else None
        if seq is None:
            raise KeyError(f"no sequence {seq_id!r} in this session (ids come from start())")
        return seq

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this rollout session is closed; open a new one with engine.session()")
        if not self.engine.in_inference:
            raise RuntimeError("the engine left inference mode (engine.train()) while a session was open; "
                               "close the session first")

    def _check_turn(self, max_new: int, min_new: int) -> None:
        if not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new!r}")
        if not isinstance(min_new, int) or min_new < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new!r}")

    def _check_stop_strings(self, turn) -> None:
        if turn.stop_strings and self.engine.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer (HybridEngine(model, tokenizer, ...)); "
                             "give stop token ids instead")

    def _check_fits(self, length: int, max_new: int, what: str) -> None:
        if length >= self.max_len:
            raise ValueError(f"a {what} of {length} tokens leaves no room before the model's maximum "
                             f"position ({self.max_len})")
        cfg = self.engine.config
        if cfg.kv_cache_tokens is not None:
            need = blocks_for(min(length + max_new, self.max_len), cfg.kv_block_size)
            have = blocks_for(cfg.kv_cache_tokens, cfg.kv_block_size)
            if need > have:
                raise ValueError(f"the KV cache holds {have * cfg.kv_block_size} tokens (kv_cache_tokens="
                                 f"{cfg.kv_cache_tokens}), too few for one sequence of {length} + {max_new} "
                                 "tokens; raise EngineConfig.kv_cache_tokens")


def _as_token_list(tokens, what: str) -> List[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    try:
        out = [int(t) for t in tokens]
        if any(isinstance(t, (bool, float)) for t in tokens):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a list of token ids (ints), got {tokens!r}") from None
    if any(t < 0 for t in out):
        raise ValueError(f"{what} must be token ids >= 0, got {out}")
    return out


def _as_prompts(prompts) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if prompts and not isinstance(prompts[0], (list, tuple)):
        prompts = [prompts]
    out = [_as_token_list(p, "a prompt") for p in prompts]
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("start() needs at least one prompt, each with at least one token")
    return out


def _check_group(g) -> int:
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {g!r}")
    return g

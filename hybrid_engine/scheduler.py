"""Which sequences run in the next window of decode steps, and which KV blocks they hold.

Host-side bookkeeping only (no tensors): the device work is loop.Runner's. A *window* is
`window` decode steps of one token per running sequence, the first of which also computes the
tokens of sequences not yet in the cache (new prompts, appended tokens, recomputation after
preemption), packed beside the decode rows; the host looks at the sampled tokens between
windows (every step on the CPU).

Every sequence keeps all its tokens; `num_cached` of them have keys/values in its blocks, the
rest (`pending`) are computed by the next forward: one token (the last sampled) for a decoding
sequence, more after an append, all of them after a preemption.

Policy:
- admission (FIFO): with continuous batching whenever a row is free, else only when every row of
  the previous static batch has finished; at most `max_rows` sequences run at once. Admission
  never preempts a running sequence: it takes free blocks, grows the pool, or evicts paused
  sequences (continuation API: waiting for an append) and waiting ones holding blocks.
- a running sequence that needs blocks for its window takes them the same way, and else preempts
  the newest running sequence (itself, if it is the newest): its blocks are freed and it goes
  back to the front of the queue, to be recomputed from its tokens when readmitted.
- forks (the G answers of one prompt, `fork_of` their source, the first): admitted with their
  source, they hold its prompt blocks and take their first token from its last prompt token's
  logits (companions: the prompt is computed once). A fork admitted later holds the source's
  blocks of the prompt's first P - 1 tokens and computes only the last one (after the source's
  prompt is computed, waiting forks take those blocks at once, so they stay shared even if the
  source ends first). A block that a sequence is about to write while others hold it is copied
  first (copy on write): in practice the prompt's last, partial block.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence as Seq, Tuple

from .kv_cache import OutOfBlocks, blocks_for

PROMPT, GENERATED, APPENDED = 0, 1, 2  # what each token of a sequence is (Sequence.kinds)
WAITING, RUNNING, PAUSED, FINISHED = "waiting", "running", "paused", "finished"


@dataclass
class Turn:
    """How long the sequence generates now: `max_new` tokens at most (`max_len` in all), EOS held
    back for `min_new`, stopped early by a token of `stop_ids` or a text of `stop_strings`."""
    max_new: int
    min_new: int = 0
    stop_ids: frozenset = frozenset()
    stop_strings: Tuple[str, ...] = ()
    start: int = 0  # len(tokens) when the turn began


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: List[int]
    kinds: bytearray            # PROMPT / GENERATED / APPENDED per token
    logprobs: List[float]       # per token; 0.0 where not generated
    seed: int                   # 62-bit; its 32-bit key (sampling.seed_key) drives the draws
    turn: Turn
    max_len: int                # the model's limit on positions
    owner: int = 0              # tensor parallelism: the rank whose request this is
    status: str = WAITING
    blocks: List[int] = field(default_factory=list)
    num_cached: int = 0
    fork_of: Optional["Sequence"] = None   # the answer of the same prompt whose prompt blocks it shares
    stop_reason: Optional[str] = None
    admitted: int = -1          # admission order (larger = newer)
    paused_at: int = -1
    key: int = -1               # sampling.seed_key(seed), set by the session
    shared_upto: int = 0        # blocks[:shared_upto] may be held by others too (the rest are its own)

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.num_cached

    @property
    def generated_this_turn(self) -> int:
        return len(self.tokens) - self.turn.start


class Scheduler:
    """Queue, running rows and paused sequences over one block pool. `pool` provides `.allocator`
    (kv_cache.BlockAllocator) and `.grow(min_blocks) -> bool` (False: the pool cannot grow)."""

    def __init__(self, pool, block_size: int, max_rows: Optional[int], continuous: bool):
        self.pool, self.block_size = pool, block_size
        self.max_rows, self.continuous = max_rows, continuous
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.paused: Dict[int, Sequence] = {}
        self._clock = 0
        self.preemptions = 0

    @property
    def allocator(self):
        return self.pool.allocator

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # -- entering and leaving ---------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def resume(self, seq: Sequence) -> None:
        """A paused sequence with new pending tokens goes back to the queue."""
        del self.paused[seq.seq_id]
        self.add(seq)

    def stop(self, seq: Sequence, reason: str, keep: bool) -> None:
        """`seq` stopped generating: paused holding its blocks (keep), or finished and freed."""
        self.running.remove(seq)
        seq.stop_reason = reason
        if keep:
            seq.status = PAUSED
            self._clock += 1
            seq.paused_at = self._clock
            self.paused[seq.seq_id] = seq
        else:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free `seq`'s blocks for good (it keeps its tokens)."""
        self.paused.pop(seq.seq_id, None)
        self._drop_blocks(seq)
        seq.status = FINISHED

    def _drop_blocks(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
        seq.blocks, seq.num_cached, seq.shared_upto = [], 0, 0

    # -- the plan of a window ---------------------------------------------------------------
    def schedule(self, window: int) -> Tuple[List[Sequence], List[Sequence], List[Sequence], List[Tuple[int, int]]]:
        """Admit, allocate and copy-on-write for the next window. Returns (extend, decode,
        companions, copies): sequences with several pending tokens (computed in the window's first
        step), those with one, forks admitted with their source (they hold its prompt blocks and
        take their first token from its logits in that step, then wait for the next window), and
        the (src, dst) block copies to make before any forward."""
        copies: List[Tuple[int, int]] = []
        self._admit(window, copies)
        for seq in sorted(self.running, key=lambda s: s.admitted):
            if seq.status == RUNNING and len(seq.tokens) > seq.num_cached:  # not preempted meanwhile
                self._prepare_writes(seq, window, copies, admitting=False)
        extend, decode, companions = [], [], []
        for s in self.running:
            pending = len(s.tokens) - s.num_cached
            (companions if pending == 0 else decode if pending == 1 else extend).append(s)
        computing = {id(s) for s in extend}
        for c in companions:  # a source preempted in this plan: the fork computes its own prompt later
            if id(c.fork_of) not in computing:
                self._evict(c)
        return extend, decode, [c for c in companions if c.status == RUNNING], copies

    def _admit(self, window: int, copies) -> None:
        if not self.continuous and self.running:
            return
        while self.waiting and (self.max_rows is None or len(self.running) < self.max_rows):
            seq = self.waiting[0]
            if seq.fork_of is not None and not seq.blocks and self._join_source(seq):
                self._start_running(self.waiting.popleft())
                continue
            if not self._prepare_writes(seq, window, copies, admitting=True):
                return
            self._start_running(self.waiting.popleft())

    def _start_running(self, seq: Sequence) -> None:
        self._clock += 1
        seq.admitted = self._clock
        seq.status = RUNNING
        self.running.append(seq)

    def _join_source(self, seq: Sequence) -> bool:
        """A fork at admission: True when it becomes its source's companion (the source computes
        the prompt in this window); else it shares the source's cached prompt but its last token,
        or, when the source no longer holds it, computes its own prompt."""
        src, n_prompt = seq.fork_of, len(seq.tokens)
        if src.status == RUNNING and src.num_cached == 0 and len(src.tokens) == n_prompt:
            self._share_prefix(src, seq, n_prompt)
            return True
        if src.num_cached >= n_prompt - 1 and src.blocks:
            self._share_prefix(src, seq, n_prompt - 1)
        seq.fork_of = None
        return False

    def _share_prefix(self, src: Sequence, seq: Sequence, n_tokens: int) -> None:
        """`seq` holds `src`'s blocks of its first n_tokens tokens, counted as cached."""
        n = blocks_for(n_tokens, self.block_size)
        seq.blocks = list(src.blocks[:n])
        self.allocator.share(seq.blocks)
        seq.num_cached, seq.shared_upto = n_tokens, n
        src.shared_upto = max(src.shared_upto, n)

    def on_cached(self, seq: Sequence, forks: Seq[Sequence]) -> None:
        """`seq`'s prompt is now in the cache: its still waiting forks take its prompt blocks (all
        but the last token's), so the prompt stays shared if `seq` ends before they run."""
        for f in forks:
            if f.status == WAITING and f.fork_of is seq and not f.blocks:
                self._share_prefix(seq, f, len(f.tokens) - 1)
                f.fork_of = None

    def _prepare_writes(self, seq: Sequence, window: int, copies, admitting: bool) -> bool:
        """Blocks for every position `seq` may write in the window (its pending tokens, then one
        per decode step), private copies of shared blocks among them. False when it could not
        get them (admission: not admitted; running: it was preempted)."""
        bs, alloc = self.block_size, self.allocator
        need = blocks_for(len(seq.tokens) + window, bs)
        # only shared blocks can need a copy; a sequence computing its prompt (nothing cached yet)
        # writes the very content its companions hold its blocks for
        first = seq.num_cached // bs if seq.num_cached else seq.shared_upto
        for i in range(first, min(seq.shared_upto, need)):
            old = seq.blocks[i]
            if alloc.refcount(old) > 1:
                got = self._acquire(1, seq, admitting)
                if got is None:
                    return False
                copies.append((old, got[0]))
                alloc.free([old])
                seq.blocks[i] = got[0]
        if need > len(seq.blocks):
            got = self._acquire(need - len(seq.blocks), seq, admitting)
            if got is None:
                return False
            seq.blocks += got
        return True

    def _acquire(self, n: int, seq: Sequence, admitting: bool) -> Optional[List[int]]:
        alloc = self.allocator
        while alloc.num_free < n:
            if self.pool.grow(alloc.num_used + n):
                continue
            victim = self._victim(seq, admitting)
            if victim is None:
                if admitting:
                    return None
                if len(self.running) == 1 and not self.paused:
                    raise OutOfBlocks(f"the KV cache ({alloc.num_blocks} blocks of {self.block_size} "
                                      f"tokens) cannot hold one sequence of {len(seq.tokens)} tokens; raise "
                                      "EngineConfig.kv_cache_tokens")
                victim = seq
            self._evict(victim)
            if victim is seq:
                return None
        return alloc.allocate(n)

    def _victim(self, seq: Sequence, admitting: bool) -> Optional[Sequence]:
        """Who gives blocks back: a paused sequence (longest paused first), then a waiting one
        holding blocks, then (not for an admission) the newest running sequence newer than `seq`."""
        held = [s for s in self.paused.values() if s.blocks]
        if held:
            return min(held, key=lambda s: s.paused_at)
        for s in reversed(self.waiting):
            if s.blocks and s is not seq:
                return s
        if admitting:
            return None
        newer = [s for s in self.running if s.admitted > seq.admitted and s.blocks]
        return max(newer, key=lambda s: s.admitted) if newer else None

    def _evict(self, seq: Sequence) -> None:
        """Free `seq`'s blocks; a running sequence is preempted to the front of the queue."""
        self._drop_blocks(seq)
        if seq.status == RUNNING and seq.admitted >= 0:
            self.running.remove(seq)
            self.preemptions += 1
            seq.status = WAITING
            self.waiting.appendleft(seq)


def make_turn(max_new: int, min_new: int, stop, start: int, what: str = "stop") -> Turn:
    """A Turn from user arguments, with the one-line errors of bad stop lists."""
    stop_ids, stop_strings = split_stop(stop, what)
    return Turn(max_new=max_new, min_new=min_new, stop_ids=frozenset(stop_ids),
                stop_strings=tuple(stop_strings), start=start)


def split_stop(stop, what: str = "stop") -> Tuple[List[int], List[str]]:
    """`stop`: None, a token id, a string, or a list of token ids and strings."""
    if stop is None:
        return [], []
    if isinstance(stop, (int, str)) and not isinstance(stop, bool):
        items = [stop]
    elif isinstance(stop, (list, tuple)):
        items = list(stop)
    else:
        items = [stop]  # refused below, by type
    ids, strings = [], []
    for s in items:
        if isinstance(s, str) and s:
            strings.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
            ids.append(int(s))
        else:
            raise TypeError(f"{what} must be token ids (ints >= 0) and/or non-empty strings, got {s!r} "
                            f"in {stop!r}")
    return ids, strings


def stop_reason(seq: Sequence, eos: frozenset, text_tail: Optional[Callable[[Sequence, int], str]]) -> Optional[str]:
    """Why `seq` stops after its last token, or None: "eos", "stop" (a stop token or string),
    "length" (the turn's budget), "max_length" (the model's positions)."""
    tok = seq.tokens[-1]
    if tok in eos:
        return "eos"
    turn = seq.turn
    if tok in turn.stop_ids:
        return "stop"
    if turn.stop_strings and text_tail is not None:
        longest = max(len(s) for s in turn.stop_strings)
        tail = text_tail(seq, longest)
        if any(s in tail for s in turn.stop_strings):
            return "stop"
    if seq.generated_this_turn >= turn.max_new:
        return "length"
    if len(seq.tokens) >= seq.max_len:
        return "max_length"
    return None

"""The device side of generation: paged batches, decoder passes, sampling, CUDA graphs.

`Runner.packed(extend, decode)` runs one step of the decode rows together with the pending
tokens of other sequences (new prompts, appended tokens), packed into one row, and samples every
row's next token; `Runner.decode(seqs, steps)` runs `steps` decode steps of one token per
sequence without looking at the results in between (the host reads them once, at
the end: every step on the CPU, `EngineConfig.stop_check_every` steps on a GPU). Which sequences
run, and where their tokens go in the cache, is the scheduler's (scheduler.py); what a
sampled token means (stop or go on) is the session's (session.py).

On a GPU the decode step can be a captured CUDA graph: its inputs live in static buffers of
`rows` x `max_blocks` (padding rows have length 0 and slot -1: they attend to nothing and write
nothing), so shapes never change between replays; one graph per row bucket (powers of two).
Under tensor parallelism each rank's rows sit in their own fixed segment of the batch.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence as Seq, Tuple

import numpy as np
import torch

from .attention import (LeanPagedDecodeAttention, LeanPagedPackedAttention, PagedBatch, PagedDecodeAttention,
                        PagedPackedAttention)
from .kv_cache import PagedKVCache
from .sampling import SamplingParams, choose_tokens_seeded, counter_uniforms, process_logits
from .scheduler import Sequence

Sampled = Tuple[int, float]  # (token, log-prob under the raw distribution; 0.0 when not asked)


class _Draws(NamedTuple):
    uniforms: Optional[torch.Tensor]  # [steps, B] fp32, None when greedy
    min_new: Optional[torch.Tensor]   # [B], None when no row holds EOS back in this window


def _pad_tables(seqs: Seq[Sequence], width: int, device) -> torch.Tensor:
    rows = [s.blocks + [-1] * (width - len(s.blocks)) for s in seqs]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(seqs), width)


def extend_batch(seqs: Seq[Sequence], block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor, PagedBatch]:
    """The pending tokens of `seqs` packed in order: ids [T], positions [T] and the PagedBatch
    (slots, block tables, lengths after the pass, query offsets) of an extend pass."""
    ids: List[int] = []
    pos: List[int] = []
    cu = [0]
    for s in seqs:
        ids += s.tokens[s.num_cached:]
        pos += range(s.num_cached, len(s.tokens))
        cu.append(len(ids))
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    pos_t = torch.tensor(pos, dtype=torch.long, device=device)
    tables = _pad_tables(seqs, max((len(s.blocks) for s in seqs), default=1), device)
    q_lens = [cu[i + 1] - cu[i] for i in range(len(seqs))]
    row_of = torch.repeat_interleave(torch.arange(len(seqs), device=device),
                                     torch.tensor(q_lens, dtype=torch.long, device=device))
    slots = tables.long()[row_of, pos_t // block_size] * block_size + pos_t % block_size
    lens = torch.tensor([len(s.tokens) for s in seqs], dtype=torch.int32, device=device)
    batch = PagedBatch(slots, tables, lens, torch.tensor(cu, dtype=torch.int32, device=device),
                       max(q_lens, default=1))
    return ids_t, pos_t, batch


class _GraphedDecode:
    """A decode step over `rows` x `max_blocks` static buffers, captured once; `segments` > 1
    (tensor parallelism) splits the rows into one fixed segment per rank."""

    def __init__(self, dec, w, cache: PagedKVCache, rows: int, max_blocks: int, tp=None):
        dev = cache.storage.device
        self.tp, self.seg = tp, rows // (tp.size if tp is not None else 1)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=dev)
        batch = PagedBatch(self.slots, self.tables, self.seq_lens)
        attn = PagedDecodeAttention(dec, self.positions, cache, batch)

        def step():
            if tp is not None:
                tp.rows = [self.seg] * tp.size
            return dec.decode(w, self.tokens, self.positions, attn)
        side = torch.cuda.Stream()  # warm-up (lazy inits, allocator) before capture; writes nothing
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tokens, positions, slots, seq_lens, tables, counts: List[int]) -> torch.Tensor:
        """Rows in owner order, `counts` rows per segment; returns this rank's rows' logits."""
        for buf, pad in ((self.tokens, 0), (self.positions, 0), (self.slots, -1), (self.seq_lens, 0)):
            buf.fill_(pad)
        start = 0
        for r, n in enumerate(counts):
            dst = slice(r * self.seg, r * self.seg + n)
            src = slice(start, start + n)
            self.tokens[dst] = tokens[src]
            self.positions[dst] = positions[src]
            self.slots[dst] = slots[src]
            self.seq_lens[dst] = seq_lens[src]
            self.tables[dst, :tables.shape[1]] = tables[src]
            start += n
        self.graph.replay()
        own = counts[self.tp.rank] if self.tp is not None else counts[0]
        return self.logits[:own]


class Runner:
    """Forward passes and sampling for one session. `engine` gives the decoder, weights, pool
    and tensor-parallel group; `max_len` is the longest a sequence may get (rotary tables)."""

    def __init__(self, engine, params: SamplingParams, eos_ids: List[int], want_logprobs: bool,
                 max_len: int, window: int, use_graphs: bool, lockstep: bool):
        self.engine, self.params, self.eos_ids = engine, params, list(eos_ids)
        self.want_lp, self.window, self.lockstep = want_logprobs, window, lockstep
        self.device, self.tp = engine.device, engine.tp
        self.dec = engine._decoder_for(max_len + window)
        self.max_pos = engine.spec.max_positions if engine.spec.pos_embed is not None else None
        self.use_graphs = use_graphs
        self._graphs: Dict[tuple, Optional[_GraphedDecode]] = {}
        self._seen: Dict[int, torch.Tensor] = {}
        self.prefill_tokens = 0

    @property
    def cache(self) -> PagedKVCache:
        return self.engine._cache

    @property
    def w(self):
        return self.engine._weights

    # -- ordering rows by owner (tensor parallelism) -------------------------------------------
    def _ordered(self, seqs: Seq[Sequence]) -> Tuple[List[Sequence], List[int]]:
        """Rows sorted by owner rank (stable), and the row count of each rank."""
        if self.tp is None:
            return list(seqs), [len(seqs)]
        order = sorted(seqs, key=lambda s: s.owner)
        counts = [0] * self.tp.size
        for s in order:
            counts[s.owner] += 1
        self.tp.rows = counts
        return order, counts

    def _own(self, order: List[Sequence], counts: List[int]) -> List[Sequence]:
        if self.tp is None:
            return order
        start = sum(counts[:self.tp.rank])
        return order[start:start + counts[self.tp.rank]]

    # -- sampling ------------------------------------------------------------------------------
    def _seen_rows(self, seqs: Seq[Sequence], vocab: int) -> Optional[torch.Tensor]:
        if self.params.repetition_penalty == 1.0:
            return None
        rows = []
        for s in seqs:
            if s.seq_id not in self._seen:
                seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                seen[torch.tensor(s.tokens, device=self.device)] = True
                self._seen[s.seq_id] = seen
            rows.append(self._seen[s.seq_id])
        return torch.stack(rows) if rows else torch.zeros(0, vocab, dtype=torch.bool, device=self.device)

    def _draws(self, seqs: Seq[Sequence], steps: int) -> "_Draws":
        """What sampling needs for `steps` steps of these rows, made once: each step's uniforms
        (hashed on the host from each sequence's key and the positions its tokens will take), and
        the rows' min_new_tokens when some row must still hold EOS back."""
        uniforms = None
        if self.params.do_sample:
            pos = np.array([len(s.tokens) for s in seqs], dtype=np.int64)[None, :] + np.arange(steps)[:, None]
            uniforms = torch.from_numpy(counter_uniforms([s.key for s in seqs], pos)).to(self.device)
        hold_eos = bool(self.eos_ids) and any(s.generated_this_turn < s.turn.min_new for s in seqs)
        min_new = torch.tensor([s.turn.min_new for s in seqs], device=self.device) if hold_eos else None
        return _Draws(uniforms, min_new)

    def _sample(self, logits, draws: "_Draws", step: int, n_gen: torch.Tensor, seen):
        """Tokens [B] and log-probs [B] (or None) of own rows at `step` of their window."""
        raw = logits.float()
        hold = draws.min_new is not None
        shaped = process_logits(raw, self.params, seen=seen, n_generated=n_gen if hold else 0,
                                eos_ids=self.eos_ids if hold else [], min_new=draws.min_new if hold else 0)
        tok = choose_tokens_seeded(shaped, self.params, None if draws.uniforms is None else draws.uniforms[step])
        lp = None
        if self.want_lp:
            lp = torch.log_softmax(raw, dim=-1).gather(1, tok[:, None])[:, 0]
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        return tok, lp

    def _share(self, tok: torch.Tensor) -> torch.Tensor:
        return tok if self.tp is None else self.tp.share_tokens(tok)

    def _store_seen(self, seqs, seen) -> None:
        if seen is not None:
            for s, row in zip(seqs, seen):
                self._seen[s.seq_id] = row

    def forget(self, seq_id: int) -> None:
        self._seen.pop(seq_id, None)

    # -- a packed step: decode rows beside new tokens of other sequences -----------------------
    def packed(self, extend: Seq[Sequence], decode: Seq[Sequence],
               companions: Seq[Sequence] = ()) -> List[Sampled]:
        """One forward over the pending tokens of `extend` (new prompts, appended tokens,
        recomputation) and the one pending token of each `decode` row; samples every row's next
        token, and each companion's (a fork of an extend row: from its source's last logits, with
        its own key). Returns (token, log-prob) per sequence in the order extend + decode +
        companions; marks the extend rows cached (the session counts the decode rows' tokens)."""
        if not extend and not decode and not self.lockstep:
            return []
        dev, bs = self.device, self.cache.block_size
        ids_e, pos_e, ext = extend_batch(extend, bs, dev)
        self.prefill_tokens += ids_e.shape[0]
        nd = len(decode)
        tok_d = torch.tensor([s.tokens[-1] for s in decode], dtype=torch.long, device=dev)
        pos_d = torch.tensor([s.num_cached for s in decode], dtype=torch.long, device=dev)
        tables_d = _pad_tables(decode, max((len(s.blocks) for s in decode), default=1), dev)
        slots_d = tables_d.long()[torch.arange(nd, device=dev), pos_d // bs] * bs + pos_d % bs
        dec_batch = PagedBatch(slots_d, tables_d, (pos_d + 1).to(torch.int32))
        ids, pos = torch.cat([tok_d, ids_e]), torch.cat([pos_d, pos_e])
        slots = torch.cat([slots_d, ext.slots])
        # the lm_head's rows: each sequence's last token, in owner order (tensor parallelism)
        rows = list(decode) + list(extend) + list(companions)
        last = {id(s): i for i, s in enumerate(decode)}
        ends = ext.cu_q_lens[1:].tolist()
        last.update({id(s): nd + e - 1 for s, e in zip(extend, ends)})
        last.update({id(s): last[id(s.fork_of)] for s in companions})
        order, counts = self._ordered(rows)
        index = torch.tensor([last[id(s)] for s in order], dtype=torch.long, device=dev)
        pos = self._clamp(pos)
        if self.dec.lean:
            attn = LeanPagedPackedAttention(self.dec, pos, self.cache, slots, nd, dec_batch, ext)
        else:
            attn = PagedPackedAttention(self.dec, pos[None], self.cache, slots, nd, dec_batch, ext)
        logits = self.dec.packed(self.w, ids, pos, attn, index)
        for s in extend:
            s.num_cached = len(s.tokens)
        if not order:
            return []
        own = self._own(order, counts)
        n_gen = torch.tensor([s.generated_this_turn for s in own], device=dev)
        seen = self._seen_rows(own, logits.shape[-1])
        tok, lp = self._sample(logits, self._draws(own, 1), 0, n_gen, seen)
        self._store_seen(own, seen)
        if self.tp is not None:
            self.tp.rows = counts
        return self._results(order, own, self._share(tok), lp, list(extend) + list(decode) + list(companions))

    def _results(self, order, own, tok_all, lp, seqs) -> List[Sampled]:
        """(token, log-prob) of `seqs`, from tokens of every row in `order` and log-probs of `own`."""
        toks = tok_all.tolist()
        lps = lp.tolist() if lp is not None else [0.0] * len(own)
        own_lp = {id(s): x for s, x in zip(own, lps)}
        by_seq = {id(s): (t, own_lp.get(id(s), 0.0)) for s, t in zip(order, toks)}
        return [by_seq[id(s)] for s in seqs]

    def _clamp(self, positions: torch.Tensor) -> torch.Tensor:
        """Learned position tables end at max_positions: tokens decoded past a sequence's stop
        (between host syncs) must not index beyond them; their results are thrown away."""
        return positions if self.max_pos is None else positions.clamp(max=self.max_pos - 1)

    # -- decode: one token per sequence, `steps` times ----------------------------------------
    def decode(self, seqs: Seq[Sequence], steps: int) -> List[List[Sampled]]:
        """`steps` decode steps for `seqs` (each with exactly one pending token, and blocks for
        `steps` more positions). Returns, per step, (token, log-prob) per sequence in the given
        order. Neither tokens nor num_cached are updated: the session accepts tokens up to a stop."""
        if not seqs and not self.lockstep:
            return [[] for _ in range(steps)]
        order, counts = self._ordered(seqs)
        own = self._own(order, counts)
        dev, bs = self.device, self.cache.block_size
        tokens = torch.tensor([s.tokens[-1] for s in order], dtype=torch.long, device=dev)
        positions = torch.tensor([s.num_cached for s in order], dtype=torch.long, device=dev)
        width = max((len(s.blocks) for s in order), default=1)
        tables = _pad_tables(order, width, dev)
        rows = torch.arange(len(order), device=dev)
        seq_lens = (positions + 1).to(torch.int32)
        n_gen = torch.tensor([s.generated_this_turn for s in own], device=dev)
        seen = None
        graphed = self._graph_for(counts, width) if order else None
        draws = self._draws(own, steps)
        out_tok, out_lp = [], []
        tables_l = tables.long()
        for step in range(steps):
            slots = tables_l[rows, positions // bs] * bs + positions % bs
            if graphed is not None:
                logits = graphed(tokens, self._clamp(positions), slots, seq_lens, tables, counts)
            else:
                batch = PagedBatch(slots, tables, seq_lens)
                attn_cls = LeanPagedDecodeAttention if self.dec.lean and order else PagedDecodeAttention
                if self.tp is not None:
                    self.tp.rows = counts
                logits = self.dec.decode(self.w, tokens, self._clamp(positions),
                                         attn_cls(self.dec, self._clamp(positions), self.cache, batch))
            if not order:
                continue
            if seen is None:
                seen = self._seen_rows(own, logits.shape[-1])
            tok, lp = self._sample(logits, draws, step, n_gen, seen)
            if self.tp is not None:
                self.tp.rows = counts  # (a graph replay leaves its capture-time rows there)
            tokens = self._share(tok)
            out_tok.append(tokens)
            out_lp.append(lp)
            positions = positions + 1
            seq_lens = seq_lens + 1
            n_gen = n_gen + 1
        self._store_seen(own, seen)
        if not order:
            return [[] for _ in range(steps)]
        toks = torch.stack(out_tok).tolist()
        lps = torch.stack(out_lp).tolist() if self.want_lp and own else None
        if self.tp is None:  # rows in the given order, all own
            return [list(zip(toks[t], lps[t] if lps is not None else [0.0] * len(seqs))) for t in range(steps)]
        index = {id(s): i for i, s in enumerate(order)}
        own_index = {id(s): i for i, s in enumerate(own)}
        result = []
        for t in range(steps):
            result.append([(toks[t][index[id(s)]],
                            lps[t][own_index[id(s)]] if lps is not None and id(s) in own_index else 0.0)
                           for s in seqs])
        return result

    # -- CUDA graphs -----------------------------------------------------------------------------
    def _graph_for(self, counts: List[int], width: int) -> Optional[_GraphedDecode]:
        if not self.use_graphs:
            return None
        seg = 1
        while seg < max(counts):
            seg *= 2
        max_blocks = self._max_blocks
        if width > max_blocks:
            return None
        rows = seg * (self.tp.size if self.tp is not None else 1)
        key = (rows, max_blocks, self.cache.storage.data_ptr())
        if key not in self._graphs:
            graphed = None
            try:
                graphed = _GraphedDecode(self.dec, self.w, self.cache, rows, max_blocks, self.tp)
            except Exception as e:  # an op that cannot be captured must not end the user's run
                warnings.warn(f"fastrlhf engine: CUDA-graph capture of the decode step failed ({e}); "
                              "decoding without graphs (EngineConfig(cuda_graphs=False) silences this)",
                              RuntimeWarning, stacklevel=3)
            if self.tp is not None and not self.tp.all_true(graphed is not None):
                graphed = None  # a group decodes all graphed or all eager, never mixed
            self._graphs[key] = graphed
        return self._graphs[key]

    _max_blocks = 1

    def set_max_blocks(self, n: int) -> None:
        """The widest block table a graph must take (the longest sequence + a window)."""
        self._max_blocks = max(1, n)

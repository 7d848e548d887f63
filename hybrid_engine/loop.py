"""The device side of generation: paged batches, decoder passes, sampling, CUDA graphs.

`Runner.extend(seqs)` runs the pending tokens of several sequences packed into one row and
samples each one's next token; `Runner.decode(seqs, steps)` runs `steps` decode steps of one
token per sequence without looking at the results in between (the host reads them once, at
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
from typing import Dict, List, Optional, Sequence as Seq, Tuple

import torch

from .attention import LeanPagedDecodeAttention, PagedBatch, PagedDecodeAttention, PagedExtendAttention
from .kv_cache import PagedKVCache
from .sampling import SamplingParams, choose_tokens_seeded, process_logits
from .scheduler import Sequence

Sampled = Tuple[int, float]  # (token, log-prob under the raw distribution; 0.0 when not asked)


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

    def _row_params(self, seqs: Seq[Sequence]):
        """(seeds, min_new) of these rows, as device tensors (made once per pass or window)."""
        return (torch.tensor([s.seed for s in seqs], dtype=torch.long, device=self.device),
                torch.tensor([s.turn.min_new for s in seqs], device=self.device))

    def _sample(self, logits, rows, positions: torch.Tensor, n_gen: torch.Tensor, seen):
        """Tokens [B] and log-probs [B] (or None) of own rows; `rows` = _row_params of them,
        `positions` the new tokens' positions."""
        raw = logits.float()
        seeds, min_new = rows
        shaped = process_logits(raw, self.params, seen=seen, n_generated=n_gen, eos_ids=self.eos_ids,
                                min_new=min_new)
        tok = choose_tokens_seeded(shaped, self.params, seeds, positions)
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

    # -- extend: pending tokens of several sequences ------------------------------------------
    def extend(self, seqs: Seq[Sequence]) -> List[Sampled]:
        """Compute every pending token of `seqs` into the cache and sample each one's next token.
        Returns (token, log-prob) per sequence in the given order; marks them cached."""
        if not seqs and not self.lockstep:
            return []
        order, counts = self._ordered(seqs)
        dev = self.device
        ids_t, pos_t, batch = extend_batch(order, self.cache.block_size, dev)
        self.prefill_tokens += ids_t.shape[0]
        last = batch.cu_q_lens[1:].long() - 1
        if self.tp is not None:  # the lm_head's rows are the sequences (one last token each)
            self.tp.rows = counts
        logits = self.dec.extend(self.w, ids_t, self._clamp(pos_t), PagedExtendAttention(
            self.dec, pos_t[None], self.cache, batch), last)
        for s in order:
            s.num_cached = len(s.tokens)
        own = self._own(order, counts)
        if not order:
            return []
        n_gen = torch.tensor([s.generated_this_turn for s in own], device=dev)
        new_pos = torch.tensor([len(s.tokens) for s in own], dtype=torch.long, device=dev)
        seen = self._seen_rows(own, logits.shape[-1])
        tok, lp = self._sample(logits, self._row_params(own), new_pos, n_gen, seen)
        self._store_seen(own, seen)
        return self._results(order, own, self._share(tok), lp, seqs)

    def _results(self, order, own, tok_all, lp, seqs) -> List[Sampled]:
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
        own_idx = slice(sum(counts[:self.tp.rank]), sum(counts[:self.tp.rank + 1])) if self.tp else slice(None)
        seen = None
        graphed = self._graph_for(counts, width) if order else None
        row_params = self._row_params(own)
        out_tok, out_lp = [], []
        tables_l = tables.long()
        for _ in range(steps):
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
            tok, lp = self._sample(logits, row_params, positions[own_idx] + 1, n_gen, seen)
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

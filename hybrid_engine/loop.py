"""The generation loop: prefill once, then one decode step per new token.

Cache columns: prompts occupy 0..P-1 (left-padded), new token t is written at column P + t for
every sequence; sequence b attends columns [starts[b], P + t] and its position id is
real_len[b] + t (HF's cumsum-of-mask positions). On GPU the decode step can be captured in a
CUDA graph: its inputs live in static buffers and the attention reads the whole cache, so
shapes never change between replays.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch

from fastrlhf.utils.positions import position_ids_from_mask

from .decoder import Decoder, ModelWeights
from .engine_types import GenerationOutput
from .kv_cache import KVCache
from .sampling import SamplingParams, choose_tokens, process_logits


class _GraphedDecode:
    """A decode step captured once per generate call (weights / cache addresses are fixed)."""

    def __init__(self, dec: Decoder, w: ModelWeights, cache: KVCache, batch: int, first_col: int):
        dev = cache.storage.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.col = torch.full((batch,), first_col, dtype=torch.long, device=dev)
        self.lens = torch.full((batch,), first_col + 1, dtype=torch.long, device=dev)
        step = lambda: dec.decode(w, self.tokens, self.positions, self.col, self.lens, cache)  # noqa: E731
        # warm-up on a side stream (lazy inits, allocator) before capture; it writes column
        # `first_col`, which the first real step overwrites
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tokens, positions, col: int):
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.col.fill_(col)
        self.lens.fill_(col + 1)
        self.graph.replay()
        return self.logits


def generation_loop(dec: Decoder, w: ModelWeights, cache: KVCache, input_ids, attention_mask,
                    max_new: int, params: SamplingParams, eos_ids: List[int], pad_id: int,
                    gen: Optional[torch.Generator], want_logprobs: bool, *, use_graphs: bool,
                    stop_check_every: int, tp=None,
                    stop_sync: Optional[Callable[[bool], bool]] = None) -> GenerationOutput:
    """Generate for the batch. With `tp` (a tensor_parallel.TPGroup) the batch is the union of the
    group's prompts: the decoder's logits are this rank's own rows (`tp.own`), which it samples
    alone (with its generator, as it would without TP); the group then shares the chosen tokens.
    The result holds the own rows only, cut where they alone would have stopped. `stop_sync`, when
    given, makes the "all finished?" decision collective (ranks that must step in lockstep)."""
    b, p = input_ids.shape
    dev = input_ids.device
    own = slice(None) if tp is None else tp.own
    mask = attention_mask.to(torch.bool)
    real_len = mask.sum(dim=-1)                                  # [B]
    cache.starts = p - real_len  # int64 throughout: no per-op index casts
    positions = position_ids_from_mask(mask)
    logits = dec.prefill(w, input_ids, mask, positions, cache)  # [B_own, V]
    b_own = logits.shape[0]

    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(b_own, logits.shape[-1], dtype=torch.bool, device=dev)
        # pads are replaced by the (always real) last prompt token so they mark nothing extra
        seen.scatter_(1, torch.where(mask, input_ids, input_ids[:, -1:])[own], True)
    eos_t = torch.tensor(eos_ids, device=dev, dtype=torch.long) if eos_ids else None
    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    out_tokens = torch.full((b_own, max_new), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros(b_own, max_new, dtype=torch.float32, device=dev) if want_logprobs else None
    write_cols = torch.arange(p, p + max_new, device=dev)
    graphed = None
    if use_graphs and max_new > 1:
        try:
            graphed = _GraphedDecode(dec, w, cache, b, p)
        except Exception as e:  # an op that cannot be captured must not end the user's run
            warnings.warn(f"fastrlhf engine: CUDA-graph capture of the decode step failed ({e}); "
                          "decoding without graphs (EngineConfig(cuda_graphs=False) silences this)",
                          RuntimeWarning, stacklevel=3)
        if tp is not None and not tp.all_true(graphed is not None):
            graphed = None  # a group decodes all graphed or all eager, never mixed

    n = n_own = 0
    for t in range(max_new):
        raw = logits.float()
        tok = choose_tokens(process_logits(raw, params, seen=seen, n_generated=t, eos_ids=eos_ids),
                            params, gen)
        if eos_t is not None:
            tok = tok.masked_fill(finished[own], pad_id)
        out_tokens[:, t] = tok
        if out_lp is not None:
            lp = torch.log_softmax(raw, dim=-1).gather(1, tok[:, None])[:, 0]
            out_lp[:, t] = lp.masked_fill(finished[own], 0.0) if eos_t is not None else lp
        n = t + 1
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if tp is not None:
            tok = tp.share_tokens(tok)
        if eos_t is not None:
            finished = finished | torch.isin(tok, eos_t)
        if t == max_new - 1:
            break
        if eos_t is not None and (t + 1) % stop_check_every == 0:
            own_done = bool(finished[own].all())
            if own_done and not n_own:
                n_own = n  # where this rank's rows alone stop
            done = own_done if tp is None else bool(finished.all())
            if stop_sync is not None:
                done = stop_sync(done)
            if done:
                break
        pos = real_len + t
        if graphed is not None:
            logits = graphed(tok, pos, p + t)
        else:
            col = write_cols[t].expand(b)
            logits = dec.decode(w, tok, pos, col, col + 1, cache, read_len=p + t + 1)
    n_own = n_own or n
    sequences = torch.cat([input_ids[own], out_tokens[:, :n_own]], dim=1)
    return GenerationOutput(sequences, None if out_lp is None else out_lp[:, :n_own])

"""A decode step for the torch reference backend, in as few torch ops as the math allows.

On a CPU a small model's decode step costs per-op dispatch, not FLOPs, and the reference ops
are written for clarity (each call rebuilds masks, gathers rotary rows, expands GQA heads,
scatters into the cache with advanced indexing). This step computes exactly the same
function with the per-step pieces built once and shared by all layers:
  - rotary cos/sin rows for this step's positions, applied to q and k together where the
    fused projection makes them one strided tensor;
  - the additive attention bias (left padding) for this step;
  - the cache write as a plain column copy (every sequence writes the same column);
  - GQA groups folded into the query axis (no copy of the cache per layer).
It is used only when ops.resolve picks the torch backend for these ops; GPU kernels always
go through fastrlhf.ops. Tests compare it with the ops path token for token.
"""
from __future__ import annotations

import torch

from .decoder import softcap


def _rotate_in_place(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int, rd: int):
    """Rotate-half rotary on the first rd features of t [..., D]; cos/sin broadcast to [..., half]."""
    x1, x2 = t[..., :half], t[..., half:rd]
    if t.dtype == torch.float32:
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
    else:  # rotary in fp32, as the reference does
        f1, f2 = x1.float(), x2.float()
        r1 = f1 * cos - f2 * sin
        r2 = f2 * cos + f1 * sin
    x1.copy_(r1)
    x2.copy_(r2)


def _qkv_heads(lw, h, b, hq, hkv, g, d, layout):
    """q [B, Hq, D], k/v [B, Hkv, D] (views) from separate or fused projections."""
    if lw.qkv is not None and layout == "grouped":
        out = lw.qkv(h).view(b, hkv, g + 2, d)
        return out[:, :, :g].reshape(b, hq, d), out[:, :, g], out[:, :, g + 1]
    if lw.qkv is not None:
        out = lw.qkv(h).view(b, hq + 2 * hkv, d)
        return out[:, :hq], out[:, hq:hq + hkv], out[:, hq + hkv:]
    return lw.q(h).view(b, hq, d), lw.k(h).view(b, hkv, d), lw.v(h).view(b, hkv, d)


def lean_decode_step(dec, w, tokens, positions, col: int, cache) -> torch.Tensor:
    """One token per sequence written at cache column `col`; returns logits [B, V]."""
    sp = dec.spec
    b = tokens.shape[0]
    hq, hkv, d = sp.n_heads, sp.n_kv_heads, sp.head_dim
    g = hq // hkv
    n = col + 1
    x = dec._embed(w, tokens[:, None], positions[:, None])  # [B, 1, E]
    rd = sp.rotary_dim
    half = rd // 2
    if rd:
        cos_rows = dec.cos[positions][:, None, :]  # [B, 1, half]: broadcasts over heads
        sin_rows = dec.sin[positions][:, None, :]
    visible = torch.arange(n, device=tokens.device)[None, :] >= cache.starts[:, None]
    bias = torch.zeros(b, 1, 1, n, dtype=torch.float32, device=tokens.device)
    bias.masked_fill_(~visible[:, None, None, :], float("-inf"))
    scale = dec.scale
    qk_norm = dec.qk_norm
    cap = dec.attn_softcap

    def attention_for(i):
        kc, vc = cache.k[i], cache.v[i]

        def attention(lw, h):
            if qk_norm:  # per-head norms (new tensors), then rotary on each
                q, k, v = _qkv_heads(lw, h, b, hq, hkv, g, d, sp.qkv_layout)
                q, k = dec._norm(q, lw.q_norm), dec._norm(k, lw.k_norm)
                if rd:
                    _rotate_in_place(q, cos_rows, sin_rows, half, rd)
                    _rotate_in_place(k, cos_rows, sin_rows, half, rd)
                q = q.reshape(b, hkv, g, d)
            elif lw.qkv is not None and sp.qkv_layout == "grouped":
                out = lw.qkv(h).view(b, hkv, g + 2, d)
                if rd:  # q and k heads of a group are adjacent: one rotary call for both
                    _rotate_in_place(out[:, :, :g + 1], cos_rows[:, :, None], sin_rows[:, :, None], half, rd)
                q, k, v = out[:, :, :g], out[:, :, g], out[:, :, g + 1]
            else:
                if lw.qkv is not None:
                    out = lw.qkv(h).view(b, hq + 2 * hkv, d)
                    if rd:  # [q heads | k heads | v heads]: q and k are one contiguous block
                        _rotate_in_place(out[:, :hq + hkv], cos_rows, sin_rows, half, rd)
                    q, k, v = out[:, :hq], out[:, hq:hq + hkv], out[:, hq + hkv:]
                else:
                    q = lw.q(h).view(b, hq, d)
                    k = lw.k(h).view(b, hkv, d)
                    v = lw.v(h).view(b, hkv, d)
                    if rd:
                        _rotate_in_place(q, cos_rows, sin_rows, half, rd)
                        _rotate_in_place(k, cos_rows, sin_rows, half, rd)
                q = q.reshape(b, hkv, g, d)
            kc[:, :, col] = k
            vc[:, :, col] = v
            scores = torch.matmul(q, kc[:, :, :n].transpose(-1, -2)).float()  # [B, Hkv, g, n]
            if cap is not None:  # attention logit softcapping (Gemma2), as the reference
                scores = torch.tanh(scores.mul_(scale).div_(cap)).mul_(cap)
                probs = torch.softmax(scores.add_(bias), dim=-1)
            else:
                probs = torch.softmax(scores.mul_(scale).add_(bias), dim=-1)
            o = torch.matmul(probs.to(vc.dtype), vc[:, :, :n])  # [B, Hkv, g, D]
            return lw.o(o.reshape(b, 1, hq * d))
        return attention

    for i, lw in enumerate(w.iter_layers()):
        x = dec._layer(lw, x, attention_for(i))
    return _lean_head(dec, w, x[:, 0])


_BIG_HEAD = 1 << 20  # weight elements from which W @ h^T pays (measured at 472x128 and 32000x768)


def _lean_head(dec, w, h: torch.Tensor) -> torch.Tensor:
    """logits [B, V] for the last hidden states h [B, E].

    The lm_head is the largest single matmul of a small model's decode step (V x E, e.g.
    32000 x 768 = 98 MB in fp32, read once per step for only B rows). With M = B tiny, MKL
    runs W @ h^T ([V, E] x [E, B], the weight as the row operand) about 1.8x faster than
    h @ W^T on this CPU (llama-110m: 17 ms -> 9.5 ms per step at B = 8), same weight view, no
    copy. The logits come back as a transposed view [B, V] (stride (1, B)); argmax / softmax
    over dim -1 read it in place."""
    if w.final_norm is not None:
        h = dec._norm(h, w.final_norm)
    if w.project_out is not None:
        h = w.project_out(h)
    lm = w.lm_head
    if lm.transposed or lm.weight.numel() < _BIG_HEAD:  # Conv1D [E, V] weight; tiny heads:
        # there the plain form wins (472 x 128: 15 us vs 21 us + a strided argmax)
        return lm(h) if dec.softcap is None else softcap(lm(h), dec.softcap)
    logits = torch.mm(lm.weight, h.t()).t()
    logits = logits if lm.bias is None else logits + lm.bias
    return logits if dec.softcap is None else softcap(logits, dec.softcap)

"""The `torch` backend of `token_logprobs`: log p(target) from hidden states and the output
embedding without the [N, V] logits.

The rows are cut into chunks and each chunk's vocabulary into slices; a running max, sum of
exponentials (and, for the entropy, sum of p·z) over the slices gives the logsumexp online, so
the largest temporary is one [rows, vocab slice] block in fp32. The backward recomputes each
block from the saved per-row logsumexp (and entropy) instead of keeping the logits:

    z = h·Wᵀ / T,  p = softmax(z),  logp = z_t - lse,  H = lse - Σ p·z
    ∂logp/∂z = onehot(t) - p,  ∂H/∂z = -p·(log p + H)
    dh = (dz / T)·W,  dW = (dz / T)ᵀ·h   (accumulated block by block in fp32)

Targets < 0 (the -100 of HF labels) mark ignored rows: log-prob and entropy 0, no gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# elements of one fp32 [rows, vocab slice] block: 4M = 16 MiB (a few such temporaries live at once)
BLOCK_ELEMENTS = 1 << 22
ROW_CHUNK = 1024


def check_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> None:
    """Clear errors for bad inputs, shared by every backend."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"token_logprobs expects hidden [N, H] and weight [V, H]; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)} (flatten batch and "
                         "sequence into N first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden size {hidden.shape[1]} != weight's {weight.shape[1]} "
                         "(pass the lm_head / output embedding weight [V, H])")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"token_logprobs: targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"token_logprobs: targets must be integer token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"token_logprobs: hidden, weight and targets must share a device; got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have "
                         "one dtype")
    if not float(temperature) > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if targets.numel() and int(targets.max()) >= weight.shape[0]:
        raise ValueError(f"token_logprobs: a target id {int(targets.max())} is >= the vocabulary size "
                         f"{weight.shape[0]}")


def _slices(n: int, v: int):
    rows = min(max(n, 1), ROW_CHUNK)
    cols = max(1, min(v, BLOCK_ELEMENTS // rows))
    for r0 in range(0, n, rows):
        for c0 in range(0, v, cols):
            yield r0, min(n, r0 + rows), c0, min(v, c0 + cols)


def _forward(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, temperature: float, want_entropy: bool):
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    m = torch.full((n,), float("-inf"), device=dev)
    s = torch.zeros(n, device=dev)
    pz = torch.zeros(n, device=dev)  # Σ exp(z - m)·z, for the entropy
    zt = torch.zeros(n, device=dev)
    for r0, r1, c0, c1 in _slices(n, v):
        z = (h[r0:r1].float() @ w[c0:c1].float().t()) / temperature
        m_old = m[r0:r1]
        m_new = torch.maximum(m_old, z.amax(1))
        alpha = torch.exp(m_old - m_new)
        e = torch.exp(z - m_new[:, None])
        s[r0:r1] = s[r0:r1] * alpha + e.sum(1)
        if want_entropy:
            pz[r0:r1] = pz[r0:r1] * alpha + (e * z).sum(1)
        m[r0:r1] = m_new
        tr = t[r0:r1]
        inside = (tr >= c0) & (tr < c1)
        col = (tr - c0).clamp(0, c1 - c0 - 1)
        zt[r0:r1] += torch.where(inside, z.gather(1, col[:, None].long())[:, 0], torch.zeros_like(m_new))
    lse = m + torch.log(s)
    keep = t >= 0
    logp = torch.where(keep, zt - lse, torch.zeros_like(lse))
    entropy = torch.where(keep, lse - pz / s, torch.zeros_like(lse)) if want_entropy else None
    return logp, entropy, lse


def _backward(h, w, t, lse, entropy, g_logp, g_ent, temperature, need_h, need_w):
    n, v = h.shape[0], w.shape[0]
    keep = (t >= 0).float()
    g_logp = g_logp.float() * keep
    g_ent = None if g_ent is None else g_ent.float() * keep
    dh = torch.zeros(n, h.shape[1], device=h.device) if need_h else None
    dw = torch.zeros(v, w.shape[1], device=w.device) if need_w else None
    for r0, r1, c0, c1 in _slices(n, v):
        hr, wc = h[r0:r1].float(), w[c0:c1].float()
        z = (hr @ wc.t()) / temperature
        logp_all = z - lse[r0:r1, None]
        p = torch.exp(logp_all)
        dz = -p * g_logp[r0:r1, None]
        if g_ent is not None:
            dz -= g_ent[r0:r1, None] * p * (logp_all + entropy[r0:r1, None])
        tr = t[r0:r1]
        inside = (tr >= c0) & (tr < c1)
        rows = torch.nonzero(inside)[:, 0]
        dz[rows, (tr[rows] - c0).long()] += g_logp[r0:r1][rows]
        dz /= temperature
        if need_h:
            dh[r0:r1] += dz @ wc
        if need_w:
            dw[c0:c1] += dz.t() @ hr
    return (None if dh is None else dh.to(h.dtype)), (None if dw is None else dw.to(w.dtype))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy):
        logp, entropy, lse = _forward(hidden, weight, targets, temperature, want_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if want_entropy else lse.new_empty(0))
        ctx.temperature, ctx.want_entropy = temperature, want_entropy
        if want_entropy:
            return logp, entropy
        return logp, lse.new_empty(0)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_ent if ctx.want_entropy else None
        dh, dw = _backward(hidden, weight, targets, lse, entropy, g_logp, g_ent, ctx.temperature,
                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None


def token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """log softmax(hidden·weightᵀ / temperature)[targets] per row, in fp32, [N] (and the entropy
    [N] of each row's distribution with return_entropy); never the [N, V] logits."""
    check_token_logprobs(hidden, weight, targets, temperature)
    logp, entropy = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), bool(return_entropy))
    return (logp, entropy) if return_entropy else logp


def unfused_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           temperature: float = 1.0, return_entropy: bool = False
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The plain path the op replaces (full logits, log_softmax, gather), for tests and benchmarks."""
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    keep = targets >= 0
    logp = logp_all.gather(1, targets.clamp(min=0).long()[:, None])[:, 0] * keep
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * keep
    return logp, entropy

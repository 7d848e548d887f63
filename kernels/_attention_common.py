"""Device functions shared by the attention kernels (attention_prefill.py, attention_decode.py).

Scores are kept in log2 units, i.e. multiplied by log2(e), so every exponential is an exp2
(one hardware instruction): softmax(x) = exp2(x·log2e − max) / Σ exp2(x·log2e − max).
The running softmax state of a query row is (m, l, acc): the max of the scores seen so far,
the sum of exp2(score − m), and the exp2-weighted sum of the values; the output is acc / l.

Triton inlines these calls, so sharing them costs nothing on the GPU.
"""
import math

import triton
import triton.language as tl

# Triton kernels may only read module globals that are tl.constexpr (host code uses .value).
LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) == exp2(x * LOG2E)


@triton.jit
def tile_dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32; IEEE (fp32 inputs): exact fp32 products instead of TF32."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def stable_tanh(x):
    """tanh that cannot overflow: tanh(|x|) = (1 - t) / (1 + t) with t = exp(-2|x|) in (0, 1]."""
    # constexprs go on the right of a product with a tensor: the interpreter runs this as
    # Python, where constexpr * tensor would wrap the tensor in a constexpr
    t = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -th, th)


@triton.jit
def scores_log2(qk, qk_scale_log2, softcap, SOFTCAP: tl.constexpr):
    """Attention scores of the raw products qk = q·k, in log2 units.

    qk_scale_log2 = scale * log2(e). SOFTCAP (Gemma2's attention logit softcapping): the
    score is softcap * tanh(scale * qk / softcap), in fp32, before any mask is applied.
    """
    if SOFTCAP:
        capped = stable_tanh(qk * (qk_scale_log2 / (softcap * LOG2E)))
        s = capped * (softcap * LOG2E)
    else:
        s = qk * qk_scale_log2
    return s


@triton.jit
def _finite_or_zero(m):
    # A row that has seen no visible key keeps max = -inf; exp2(-inf - -inf) would be NaN, so
    # such a row subtracts 0 instead and every exp2 gives 0.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """Fold one tile of scores s [M, N] (log2 units, -inf where a key is not visible) into the
    running max m_i [M] and sum l_i [M].

    Returns (p, alpha, m_new, l_new); the caller folds the tile's values v [N, D] in with
    acc = acc * alpha[:, None] + p @ v (the values are loaded only after this step, as in
    a hand-written loop, so the GPU compiler sees the same instruction order).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = _finite_or_zero(m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def merge_softmax_states(acc, m, l, acc_part, m_part, l_part):
    """Combine a running softmax state (acc, m, l) with a partial one over other keys (the
    split-K chunks of decode), in the same units. Returns the merged (acc, m, l)."""
    m_new = tl.maximum(m, m_part)
    m_safe = _finite_or_zero(m_new)
    alpha = tl.math.exp2(m - m_safe)
    beta = tl.math.exp2(m_part - m_safe)
    l_new = l * alpha + l_part * beta
    acc_new = acc * alpha + acc_part * beta
    return acc_new, m_new, l_new


# ---------------------------------------------------------------- which keys a query sees
# A query at column `col` (prefill: query index + Sk - Sq; packed rows: the token index) may see
# key columns in [lo, hi): causal hi = col + 1; a sliding window lo = col - window + 1; packed
# sequences [seq_lo, seq_hi), its own sequence's tokens. Both bounds are non-decreasing in the
# query index, so the keys of a block of queries lie in [lo(first), hi(last)) and the keys in
# [lo(last), hi(first)) are seen by every query of the block (no per-element masking needed).
@triton.jit
def key_bounds(q_idx, offset, seq_k, window, SeqLo, SeqHi,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """[lo, hi) of the key columns the query with index q_idx (a scalar) may see."""
    col = q_idx + offset
    lo = q_idx * 0
    hi = lo + seq_k
    if CAUSAL:
        hi = tl.minimum(hi, col + 1)
    if WINDOW:
        lo = tl.maximum(lo, col - window + 1)
    if PACKED:
        lo = tl.maximum(lo, tl.load(SeqLo + q_idx))
        hi = tl.minimum(hi, tl.load(SeqHi + q_idx))
    return lo, hi


@triton.jit
def query_columns(s_q, row_ok, offset, SeqLo, SeqHi, PACKED: tl.constexpr):
    """Key column of each query row (s_q + offset), and the [lo, hi) of its packed sequence
    (read only when PACKED; the column itself otherwise, unused)."""
    cols = s_q + offset
    seq_lo = cols
    seq_hi = cols
    if PACKED:
        seq_lo = tl.load(SeqLo + s_q, mask=row_ok, other=0)
        seq_hi = tl.load(SeqHi + s_q, mask=row_ok, other=0)
    return cols, seq_lo, seq_hi


@triton.jit
def apply_key_rules(allowed, keys, cols, seq_lo, seq_hi, window,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PACKED: tl.constexpr):
    """allowed & the causal / window / packing rules for key columns `keys` and query columns
    `cols` (with their sequences' [seq_lo, seq_hi)); operands broadcast in either orientation."""
    if CAUSAL:
        allowed = allowed & (keys <= cols)
    if WINDOW:
        allowed = allowed & (keys > cols - window)
    if PACKED:
        allowed = allowed & (keys >= seq_lo) & (keys < seq_hi)
    return allowed


@triton.jit
def alibi_log2(keys, cols, slope_log2):
    """ALiBi bias slope * (key column - query column) in log2 units (slope_log2 = slope * log2 e)."""
    return slope_log2 * (keys - cols).to(tl.float32)

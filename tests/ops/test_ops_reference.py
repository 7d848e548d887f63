"""The torch reference backend against independent float64 formulations."""
import math

import pytest
import torch

from fastrlhf import ops
from conftest import left_pad_mask, rel_err


def _naive_attention(q, k, v, mask_bool, scale, softcap=None):
    """Explicit per-(batch, head, query) loop in float64: softmax(q·kᵀ·s + mask)·v
    (scores capped to softcap·tanh(scores / softcap) when softcap is given)."""
    b, hq, sq, d = q.shape
    hk = k.shape[1]
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(sq):
                keys = mask_bool[bi, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = (k[bi, kh, keys].double() @ q[bi, h, i].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.softmax(s, 0)
                out[bi, h, i] = p @ v[bi, kh, keys].double()
    return out


@pytest.mark.parametrize("b,hq,hk,sq,sk,d", [(3, 4, 4, 7, 7, 16), (2, 8, 2, 5, 13, 8), (2, 4, 1, 1, 9, 32)])
def test_prefill_causal_left_padding_gqa(b, hq, hk, sq, sk, d):
    torch.manual_seed(b * 100 + sq)
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    lengths = [sk - i * 2 for i in range(b)]
    am = left_pad_mask(lengths, sk)
    allowed = torch.zeros(b, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for i in range(sq):
            for j in range(sk):
                allowed[bi, i, j] = j <= i + (sk - sq) and am[bi, j] == 1
    scale = 1 / math.sqrt(d)
    ref = _naive_attention(q, k, v, allowed, scale)
    out = ops.attention_prefill(q, k, v, causal=True, attention_mask=am, backend="torch")
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-5
    # fully masked query rows (left-pad positions when sq == sk) are exactly zero
    for bi in range(b):
        for i in range(sq):
            if not allowed[bi, i].any():
                assert torch.all(out[bi, :, i] == 0)


def test_prefill_non_causal_right_padding():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    allowed = am[:, None, :].bool().expand(2, 6, 6)
    ref = _naive_attention(q, k, v, allowed, 0.3)
    out = ops.attention_prefill(q, k, v, causal=False, attention_mask=am, scale=0.3, backend="torch")
    assert rel_err(out, ref) < 1e-5


def test_decode_matches_naive_with_starts_and_lens():
    torch.manual_seed(2)
    b, hq, hk, smax, d = 3, 8, 2, 11, 16
    q = torch.randn(b, hq, d)
    kc, vc = torch.randn(b, hk, smax, d), torch.randn(b, hk, smax, d)
    starts, lens = torch.tensor([0, 3, 5]), torch.tensor([11, 9, 6])
    allowed = torch.zeros(b, 1, smax, dtype=torch.bool)
    for bi in range(b):
        allowed[bi, 0, starts[bi]:lens[bi]] = True
    ref = _naive_attention(q[:, :, None], kc, vc, allowed, 1 / math.sqrt(d))[:, :, 0]
    out = ops.attention_decode(q, kc, vc, lens, cache_starts=starts, backend="torch")
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_attention_softcap_prefill_and_decode_match_naive(backend, monkeypatch):
    """softcap= caps the scores (Gemma2): the triton kernels apply it themselves (interpreter);
    the cuda backend has no softcap kernel and hands such calls to the reference (its functions
    are called directly: the fallback works on CPU tensors too)."""
    prefill, decode = ops.attention_prefill, ops.attention_decode
    kw = dict(backend=backend)
    if backend == "cuda":
        from fastrlhf.ops import cuda_backend
        prefill, decode, kw = cuda_backend.attention_prefill, cuda_backend.attention_decode, {}
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(3)
    b, hq, hk, s, d, cap = 2, 4, 2, 6, 8, 1.5
    q, k, v = torch.randn(b, hq, s, d) * 2, torch.randn(b, hk, s, d) * 2, torch.randn(b, hk, s, d)
    am = left_pad_mask([6, 4], s)
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & am[:, None, :].bool()
    ref = _naive_attention(q, k, v, allowed, 0.4, softcap=cap)
    out = prefill(q, k, v, causal=True, attention_mask=am, scale=0.4, softcap=cap, **kw)
    assert rel_err(out[:, :, 2:], ref[:, :, 2:]) < 1e-5
    uncapped = _naive_attention(q, k, v, allowed, 0.4)
    assert rel_err(uncapped[:, :, 2:], ref[:, :, 2:]) > 1e-2, "the cap had no effect"
    lens, starts = torch.tensor([6, 6]), torch.tensor([0, 2])
    dec = decode(q[:, :, -1], k, v, lens, cache_starts=starts, scale=0.4, softcap=cap, **kw)
    assert rel_err(dec, ref[:, :, -1]) < 1e-5


def test_kv_cache_append_writes_only_its_slots():
    b, h, smax, d, t = 3, 2, 10, 4, 3
    kc, vc = torch.full((b, h, smax, d), -7.0), torch.full((b, h, smax, d), -7.0)
    k, v = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    pos = torch.tensor([0, 4, 7])
    ops.kv_cache_append(kc, vc, k, v, pos, backend="torch")
    for bi in range(b):
        p = int(pos[bi])
        assert torch.equal(kc[bi, :, p:p + t], k[bi]) and torch.equal(vc[bi, :, p:p + t], v[bi])
        untouched = torch.ones(smax, dtype=torch.bool)
        untouched[p:p + t] = False
        assert torch.all(kc[bi][:, untouched] == -7.0)


def test_lora_linear_and_fuse_match_float64():
    torch.manual_seed(3)
    x, w, bias = torch.randn(5, 7, 33), torch.randn(19, 33), torch.randn(19)
    a, bm = torch.randn(4, 33), torch.randn(19, 4)
    s = 0.75
    ref = x.double() @ w.double().T + bias.double() + s * (x.double() @ a.double().T) @ bm.double().T
    assert rel_err(ops.lora_linear(x, w, bias, a, bm, s, backend="torch"), ref) < 1e-6
    fused = ops.lora_fuse(w, a, bm, s, backend="torch")
    assert rel_err(fused, w.double() + s * bm.double() @ a.double()) < 1e-6
    assert rel_err(ops.lora_unfuse(fused, a, bm, s, backend="torch"), w) < 1e-5
    w2 = w.clone()
    ops.lora_fuse(w2, a, bm, s, out=w2, backend="torch")
    assert torch.equal(w2, fused)


def test_norms_match_float64_and_residual():
    torch.manual_seed(4)
    x, r, w, bb = torch.randn(3, 5, 37), torch.randn(3, 5, 37), torch.randn(37), torch.randn(37)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel_err(ops.rms_norm(x, w, 1e-6, backend="torch"), ref) < 1e-6
    y, h = ops.rms_norm(x, w, 1e-6, residual=r, backend="torch")
    hd = xd + r.double()
    assert rel_err(h, hd) < 1e-7
    assert rel_err(y, hd / torch.sqrt((hd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()) < 1e-6
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    ref_ln = (xd - mu) / torch.sqrt(var + 1e-5) * w.double() + bb.double()
    assert rel_err(ops.layer_norm(x, w, bb, 1e-5, backend="torch"), ref_ln) < 1e-6


@pytest.mark.parametrize("shape", [(3, 5, 37), (32, 1, 128), (2, 7, 1000)])
def test_fp32_rms_norm_is_the_composite_expression_bit_for_bit(shape):
    """The fp32 reference runs torch's rms_norm in one call: it must give exactly what the spelled-out
    expression (HF's RMSNorm: x * rsqrt(mean(x^2) + eps) * weight) gives, residual or not."""
    torch.manual_seed(shape[-1])
    x, r, w = torch.randn(shape) * 3, torch.randn(shape), torch.randn(shape[-1])

    def spelled(h, weight):
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return y if weight is None else y * weight

    for weight in (w, None):
        assert torch.equal(ops.rms_norm(x, weight, 1e-5, backend="torch"), spelled(x, weight))
        y, h = ops.rms_norm(x, weight, 1e-5, residual=r, backend="torch")
        assert torch.equal(h, x + r) and torch.equal(y, spelled(x + r, weight))


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_rotary_matches_complex_rotation(rotary_dim):
    torch.manual_seed(5)
    b, h, s, d = 2, 3, 6, 16
    rd = d if rotary_dim is None else rotary_dim
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).double() / rd))
    ang = torch.arange(64).double()[:, None] * inv[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    q, k = torch.randn(b, h, s, d), torch.randn(b, 1, s, d)
    pos = torch.stack([torch.arange(s), torch.arange(s) + 9])
    q0, k0 = q.clone(), k.clone()
    ops.rotary(q, k, cos, sin, pos, rotary_dim=rotary_dim, backend="torch")
    for t0, t in ((q0, q), (k0, k)):
        half = rd // 2
        z = torch.complex(t0[..., :half].double(), t0[..., half:rd].double())
        rot = z * torch.polar(torch.ones_like(ang[pos]), ang[pos])[:, None]
        ref = torch.cat([rot.real, rot.imag, t0[..., rd:].double()], -1)
        assert rel_err(t, ref) < 1e-6


def test_dispatch_unavailable_backend_warns_and_falls_back(monkeypatch):
    from fastrlhf.ops import dispatch
    monkeypatch.setitem(dispatch._loaded, "cuda", ImportError("no nvcc here"))
    dispatch._warned.clear()
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.warns(RuntimeWarning, match="no nvcc here"):
        y = ops.rms_norm(x, w, backend="cuda")
    assert torch.allclose(y, ops.rms_norm(x, w, backend="torch"))
    monkeypatch.setenv("FASTRLHF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND"):
        ops.rms_norm(x, w)
    monkeypatch.setenv("FASTRLHF_BACKEND", "torch")
    assert ops.resolve("rms_norm", x.device)[0] == "torch"


def test_device_table_sets_auto_preference(tmp_path, monkeypatch):
    import json
    from fastrlhf.ops import dispatch
    assert dispatch.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"device": "x", "ops": {"rms_norm": ["triton", "cuda", "bogus"]}}))
    monkeypatch.setattr(dispatch, "_preference", {})
    assert dispatch.load_device_table(torch.device("cuda"), str(p))
    assert dispatch._preference["rms_norm"] == ("triton", "cuda", "torch")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert not dispatch.load_device_table(torch.device("cuda"), str(bad))


def test_packaged_device_table_is_found_through_importlib_resources(tmp_path, monkeypatch):
    """`auto` on a GPU reads <TABLES_PACKAGE>/<device slug>.json as package data (so it also
    loads from a wheel): a table placed in a package folder is picked up for that device."""
    import importlib.resources
    import json
    import sys
    from fastrlhf.ops import dispatch
    # the real tables package resolves (in an editable install: python/fastrlhf/ops/tables)
    assert importlib.resources.files(dispatch.TABLES_PACKAGE).joinpath("__init__.py").is_file()
    pkg = tmp_path / "fake_tables"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "test-gpu-9000-80gb.json").write_text(
        json.dumps({"device": "Test GPU 9000 80GB", "ops": {"layer_norm": ["torch", "triton"]}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_tables", raising=False)
    monkeypatch.setattr(dispatch, "TABLES_PACKAGE", "fake_tables")
    monkeypatch.setattr(dispatch, "_preference", {})
    monkeypatch.setattr(dispatch, "_tables_loaded", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU 9000 80GB")
    assert dispatch.load_device_table(torch.device("cuda"))
    assert dispatch._preference["layer_norm"] == ("torch", "triton", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Other GPU")
    assert not dispatch.load_device_table(torch.device("cuda"))  # no table ships for it


# ------------------------------------------------------------------ window, alibi, packed sequences
def _naive_biased(q, k, v, visible, scale, q_col, softcap=None, slopes=None):
    """float64 loops: query (bi, i) at column q_col(bi, i) over the keys j with visible(bi, i, j);
    score = q·k·scale -> softcap -> + slope[h]·(j - q_col) (the contract's order)."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(sq):
            keys = [j for j in range(sk) if visible(bi, i, j)]
            if not keys:
                continue
            keys_t = torch.tensor(keys)
            for h in range(hq):
                kh = h // (hq // hk)
                s = (k[bi, kh, keys_t].double() @ q[bi, h, i].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                if slopes is not None:
                    s = s + float(slopes[h]) * (keys_t.double() - q_col(bi, i))
                out[bi, h, i] = torch.softmax(s, 0) @ v[bi, kh, keys_t].double()
    return out


def _prefill_rule(sq, sk, causal, window, mask=None, cu=None):
    """The contract's visibility rule, written out per (row, query, key)."""
    seq_of = None
    if cu is not None:
        seq_of = [next((n for n in range(len(cu) - 1) if cu[n] <= t < cu[n + 1]), -1) for t in range(sk)]

    def visible(bi, i, j):
        col = i + sk - sq
        if causal and j > col:
            return False
        if window is not None and j <= col - window:
            return False
        if mask is not None and not mask[bi, j]:
            return False
        if seq_of is not None and (seq_of[i] < 0 or seq_of[i] != seq_of[j]):
            return False
        return True
    return visible


def _f64(*shapes, seed):
    torch.manual_seed(seed)
    return [torch.randn(*s, dtype=torch.float64) for s in shapes]


# (b, hq, hk, sq, sk, window, left-pad lengths or None, alibi, softcap)
WINDOW_ALIBI_CASES = {
    "window1": (2, 4, 2, 7, 7, 1, [7, 4], False, None),
    "window_eq_sk": (2, 4, 2, 9, 9, 9, [9, 5], False, None),
    "window_gt_sk": (1, 2, 1, 6, 6, 100, None, False, None),
    "window3_left_pad": (3, 2, 2, 10, 10, 3, [10, 6, 1], False, None),
    "window4_bottom_right": (2, 4, 1, 3, 11, 4, [11, 7], False, None),
    "alibi_gqa_window_softcap": (2, 6, 2, 8, 8, 5, [8, 3], True, 1.5),
    "alibi_mqa_bottom_right": (2, 4, 1, 4, 9, None, [9, 6], True, None),
    "alibi_softcap_no_mask": (1, 3, 3, 5, 5, None, None, True, 2.0),
}


@pytest.mark.parametrize("case", sorted(WINDOW_ALIBI_CASES))
def test_prefill_window_and_alibi_match_naive_float64(case):
    b, hq, hk, sq, sk, window, lengths, alibi, cap = WINDOW_ALIBI_CASES[case]
    q, k, v = _f64((b, hq, sq, 8), (b, hk, sk, 8), (b, hk, sk, 8), seed=sum(map(ord, case)))
    q, k = q * 2, k * 2
    mask = left_pad_mask(lengths, sk) if lengths else None
    slopes = torch.rand(hq) * 0.7 + 0.05 if alibi else None
    scale = 0.3
    expected = _naive_biased(q, k, v, _prefill_rule(sq, sk, True, window, mask), scale,
                             lambda bi, i: i + sk - sq, softcap=cap, slopes=slopes)
    out = ops.attention_prefill(q, k, v, causal=True, attention_mask=mask, scale=scale, softcap=cap,
                                window=window, alibi_slopes=slopes, backend="torch")
    assert out.dtype == torch.float64 and not torch.isnan(out).any()
    assert rel_err(out, expected) < 1e-12
    if alibi:  # the bias changed the result
        plain = ops.attention_prefill(q, k, v, causal=True, attention_mask=mask, scale=scale, softcap=cap,
                                      window=window, backend="torch")
        assert rel_err(plain, expected) > 1e-3
    if window is not None and window < sk:  # so did the window
        full = ops.attention_prefill(q, k, v, causal=True, attention_mask=mask, scale=scale, softcap=cap,
                                     alibi_slopes=slopes, backend="torch")
        assert rel_err(full, expected) > 1e-3


def test_window_boundaries_exactly():
    """window 1: every query sees only itself (out = its own v, pad rows 0); a window >= Sk is
    bit-identical to no window."""
    q, k, v = _f64((2, 2, 6, 4), (2, 2, 6, 4), (2, 2, 6, 4), seed=21)
    mask = left_pad_mask([6, 2], 6)
    one = ops.attention_prefill(q, k, v, attention_mask=mask, window=1, backend="torch")
    assert torch.equal(one[0], v[0])
    assert torch.equal(one[1, :, 4:], v[1, :, 4:]) and torch.all(one[1, :, :4] == 0)
    full = ops.attention_prefill(q, k, v, attention_mask=mask, backend="torch")
    for w in (6, 7, 1000):
        assert torch.equal(ops.attention_prefill(q, k, v, attention_mask=mask, window=w, backend="torch"), full)


def test_alibi_equals_bloom_slope_times_key_position():
    """Under softmax, slope·(j - i) equals Bloom's slope·(key position), positions counted from each
    row's first real token (left padding)."""
    b, hq, s, d = 2, 4, 7, 8
    q, k, v = _f64((b, hq, s, d), (b, hq, s, d), (b, hq, s, d), seed=22)
    mask = left_pad_mask([7, 4], s)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    key_pos = (mask.cumsum(-1) - 1).clamp_min(0).double()  # [B, S]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d) + slopes.double()[None, :, None, None] * key_pos[:, None, None, :]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    bloom = p @ v
    out = ops.attention_prefill(q, k, v, attention_mask=mask, alibi_slopes=slopes, backend="torch")
    assert rel_err(out[0], bloom[0]) < 1e-12 and rel_err(out[1, :, 3:], bloom[1, :, 3:]) < 1e-12


@pytest.mark.parametrize("window,alibi,cap", [(1, False, None), (3, True, None), (None, True, 1.5), (50, True, None)])
def test_decode_window_alibi_match_naive_and_prefill_last_row(window, alibi, cap):
    b, hq, hk, smax, d = 3, 4, 2, 12, 8
    q, kc, vc = _f64((b, hq, d), (b, hk, smax, d), (b, hk, smax, d), seed=23)
    q, kc = q * 2, kc * 2
    lens, starts = torch.tensor([12, 9, 4]), torch.tensor([0, 3, 2])
    slopes = torch.rand(hq) * 0.5 + 0.1 if alibi else None

    def visible(bi, i, j):
        col = int(lens[bi]) - 1
        return starts[bi] <= j <= col and (window is None or j > col - window)
    expected = _naive_biased(q[:, :, None], kc, vc, visible, 0.4, lambda bi, i: int(lens[bi]) - 1,
                             softcap=cap, slopes=slopes)[:, :, 0]
    out = ops.attention_decode(q, kc, vc, lens, cache_starts=starts, scale=0.4, softcap=cap, window=window,
                               alibi_slopes=slopes, backend="torch")
    assert rel_err(out, expected) < 1e-12
    # the same query as the last row of a left-padded prefill over the row's keys
    for bi in range(b):
        n = int(lens[bi])
        row_mask = (torch.arange(n) >= starts[bi]).long()[None]
        last = ops.attention_prefill(q[bi:bi + 1, :, None], kc[bi:bi + 1, :, :n], vc[bi:bi + 1, :, :n],
                                     attention_mask=row_mask, scale=0.4, softcap=cap, window=window,
                                     alibi_slopes=slopes, backend="torch")[:, :, 0]
        assert rel_err(last, out[bi:bi + 1]) < 1e-12


# cumulative boundaries over a 15-token row: one-token sequences, an empty sequence, 2 tail tokens
PACKED_CU = [0, 1, 5, 5, 12, 13]


@pytest.mark.parametrize("causal,window,alibi,cap", [(True, None, False, None), (False, None, False, None),
                                                     (True, 3, True, 1.5), (True, 2, False, None)])
def test_packed_matches_naive_and_separate_sequences(causal, window, alibi, cap):
    t, hq, hk, d = 15, 6, 2, 8
    q, k, v = _f64((1, hq, t, d), (1, hk, t, d), (1, hk, t, d), seed=24)
    cu = torch.tensor(PACKED_CU, dtype=torch.int32)
    slopes = torch.rand(hq) * 0.5 + 0.1 if alibi else None
    kw = dict(causal=causal, scale=0.35, softcap=cap, window=window, alibi_slopes=slopes)
    out = ops.attention_prefill(q, k, v, cu_seqlens=cu, backend="torch", **kw)
    expected = _naive_biased(q, k, v, _prefill_rule(t, t, causal, window, cu=PACKED_CU), 0.35,
                             lambda bi, i: i, softcap=cap, slopes=slopes)
    assert rel_err(out, expected) < 1e-12
    assert torch.all(out[:, :, PACKED_CU[-1]:] == 0)  # tokens after the last boundary
    for lo, hi in zip(PACKED_CU[:-1], PACKED_CU[1:]):
        if hi > lo:  # each sequence alone, unpacked
            alone = ops.attention_prefill(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], backend="torch", **kw)
            assert rel_err(out[:, :, lo:hi], alone) < 1e-12


def test_packed_gradients_equal_separate_sequences():
    t, h, d = 9, 2, 4
    q, k, v = _f64((1, h, t, d), (1, h, t, d), (1, h, t, d), seed=25)
    cu = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grad = torch.randn(1, h, t, d, dtype=torch.float64)
    packed = torch.autograd.grad(ops.attention_prefill(*leaves, cu_seqlens=cu, backend="torch"), leaves, grad)
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        part = [x[:, :, lo:hi].detach().clone().requires_grad_() for x in (q, k, v)]
        alone = torch.autograd.grad(ops.attention_prefill(*part, backend="torch"), part, grad[:, :, lo:hi])
        for g_packed, g_alone in zip(packed, alone):
            assert rel_err(g_packed[:, :, lo:hi], g_alone) < 1e-12


def _bad_calls():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    pre = lambda **kw: ops.attention_prefill(q, k, k, backend="torch", **kw)  # noqa: E731
    return [
        ("window", lambda: pre(window=0)),
        ("window", lambda: pre(window=-3)),
        ("window", lambda: pre(window=2.5)),
        ("window", lambda: pre(window=True)),
        ("causal", lambda: pre(window=3, causal=False)),
        ("alibi_slopes", lambda: pre(alibi_slopes=torch.ones(2))),
        ("alibi_slopes", lambda: pre(alibi_slopes=torch.ones(4, dtype=torch.long))),
        ("ONE row", lambda: ops.attention_prefill(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                                                  k.expand(2, -1, -1, -1), cu_seqlens=cu, backend="torch")),
        ("not both", lambda: pre(cu_seqlens=cu, attention_mask=torch.ones(1, 6))),
        ("as many queries", lambda: ops.attention_prefill(q[:, :, :3], k, k, cu_seqlens=cu, backend="torch")),
        ("start at 0", lambda: pre(cu_seqlens=torch.tensor([1, 6], dtype=torch.int32))),
        ("never decrease", lambda: pre(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))),
        ("at most", lambda: pre(cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))),
        ("integer", lambda: pre(cu_seqlens=torch.tensor([0.0, 6.0]))),
        ("window", lambda: ops.attention_decode(q[:, :, 0], k, k, torch.tensor([6]), window=0, backend="torch")),
        ("alibi_slopes", lambda: ops.attention_decode(q[:, :, 0], k, k, torch.tensor([6]),
                                                      alibi_slopes=torch.ones(3), backend="torch")),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_window_alibi_packed_arguments_are_one_line_errors(index):
    match, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=match) as err:
        call()
    assert "\n" not in str(err.value)

"""The torch reference backend against independent float64 formulations."""
import math

import pytest
import torch

from fastrlhf import ops
from fastrlhf.utils.testing import rel_err, left_pad_mask


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

"""fastrlhf.inject on packed batches (HF's padding-free convention) and on sliding-window models.

An injected model given sequences packed into one row (no attention mask, position_ids
restarting at 0 per sequence, as DataCollatorWithFlattening makes them) must give the same
logits and parameter gradients as the plain HF model on the same sequences right-padded into a
batch; a sliding-window model (window shorter than the batch) the same as HF's own attention.
"""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorWithFlattening

import fastrlhf
from fastrlhf.hybrid_engine import injection
from conftest import TinyModels, no_dropout

LENGTHS = [5, 1, 9, 4]  # a one-token sequence among them
PACKED_FAMILIES = ["llama", "gemma2", "gpt2"]  # GQA; softcap and window layers; learned positions


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return TinyModels(tmp_path_factory, no_dropout)


def _sequences(seed=31):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (n,), generator=g).tolist() for n in LENGTHS]


def _padded(seqs):
    """Right-padded batch: ids, mask, and the (row, column) of every real token in packed order."""
    longest = max(map(len, seqs))
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    where = [(i, j) for i, s in enumerate(seqs) for j in range(len(s))]
    return ids, mask, (torch.tensor([w[0] for w in where]), torch.tensor([w[1] for w in where]))


def _loss(logits):
    """A loss touching every logit with a different weight (fixed by the seed)."""
    g = torch.Generator().manual_seed(7)
    return (logits.float() * torch.randn(logits.shape, generator=g)).sum()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(fast_logits, ref_logits, fast, ref):
    assert ((fast_logits - ref_logits).norm() / ref_logits.norm()).item() < 1e-5
    _loss(fast_logits).backward()
    _loss(ref_logits).backward()
    got, expected = _grads(fast), _grads(ref)
    assert got.keys() == expected.keys()
    total = torch.sqrt(sum(g.norm() ** 2 for g in expected.values()))
    for n, g in expected.items():
        assert (got[n] - g).norm() <= 1e-4 * g.norm() + 1e-6 * total, n


@pytest.mark.parametrize("name", PACKED_FAMILIES)
def test_packed_batch_gives_the_padded_logits_and_gradients(models, name):
    ref = copy.deepcopy(models[name])
    fast = fastrlhf.inject(copy.deepcopy(models[name]))
    seqs = _sequences()
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in seqs])
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    packed_logits = fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    ids, mask, (rows, cols) = _padded(seqs)
    padded_logits = ref(input_ids=ids, attention_mask=mask).logits[rows, cols]
    _assert_same(packed_logits, padded_logits, fast, ref)


def test_flash_attn_kwargs_and_several_packed_rows(models, monkeypatch):
    """cu_seq_lens_q from the collator (return_flash_attn_kwargs) is used as given; a batch of two
    packed rows is attended as the rows end to end (each row's end a boundary)."""
    ref = copy.deepcopy(models["llama"])
    fast = fastrlhf.inject(copy.deepcopy(models["llama"]))
    seqs = _sequences(seed=32)
    seen = []
    attention_prefill = injection.ops.attention_prefill
    monkeypatch.setattr(injection.ops, "attention_prefill",
                        lambda *a, **kw: seen.append(kw.get("cu_seqlens")) or attention_prefill(*a, **kw))
    batch = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(
        [{"input_ids": s} for s in seqs])
    kwargs = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    logits = fast(input_ids=batch["input_ids"], **kwargs).logits[0]  # no position_ids: the kwargs decide
    assert seen and all(torch.equal(c, batch["cu_seq_lens_q"].int()) for c in seen)
    ids, mask, (rows, cols) = _padded(seqs)
    expected = ref(input_ids=ids, attention_mask=mask).logits[rows, cols]
    assert ((logits - expected).norm() / expected.norm()).item() < 1e-5
    # two packed rows of equal length: sequences 0+1 and 2+3 (5 + 1 + 9 + 4 = 6 + 13: pad row 0 with a 7-token one)
    seqs2 = [seqs[0], seqs[1], [7] * 7, seqs[2], seqs[3]]
    rows2 = [seqs2[0] + seqs2[1] + seqs2[2], seqs2[3] + seqs2[4]]
    pos2 = [list(range(5)) + [0] + list(range(7)), list(range(9)) + list(range(4))]
    seen.clear()
    out = fast(input_ids=torch.tensor(rows2), position_ids=torch.tensor(pos2)).logits
    assert seen[0].tolist() == [0, 5, 6, 13, 22, 26]
    ids, mask, (r, c) = _padded(seqs2)
    expected = ref(input_ids=ids, attention_mask=mask).logits[r, c]
    assert ((out.reshape(-1, out.shape[-1]) - expected).norm() / expected.norm()).item() < 1e-5


def _windowed_model(family, tmp_path, **extra):
    cfg = AutoConfig.for_model(family, hidden_size=48, num_hidden_layers=2, intermediate_size=80,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                               max_position_embeddings=128, attention_dropout=0.0, initializer_range=0.25, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family,extra", [
    ("mistral", dict(sliding_window=4)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),  # layer 1 windowed
    ("gemma2", dict(sliding_window=3, head_dim=16, attn_logit_softcapping=2.0)),  # local/global layers
])
def test_sliding_window_models_inject_and_equal_hf(family, extra, tmp_path):
    """Windows shorter than the batch: padded (left) and packed batches equal HF eager attention."""
    ref = _windowed_model(family, tmp_path, **extra)
    fast = fastrlhf.inject(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(33)
    ids = torch.randint(4, 90, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    _assert_same(fast(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real],
                 ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real], fast, ref)
    fast.zero_grad(), ref.zero_grad()
    seqs = _sequences(seed=34)
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s} for s in seqs])
    padded_ids, padded_mask, (rows, cols) = _padded(seqs)
    _assert_same(fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0],
                 ref(input_ids=padded_ids, attention_mask=padded_mask).logits[rows, cols], fast, ref)


def test_boundaries_follow_hf_rule_and_plain_positions_are_not_packed():
    q = torch.zeros(1, 2, 8, 4)
    kw = dict(position_ids=torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0]]))  # 5 follows 1: a new sequence too
    assert injection.packed_boundaries(q, q, None, kw).tolist() == [0, 3, 5, 7, 8]
    assert injection.packed_boundaries(q, q, None, dict(position_ids=torch.arange(3, 11)[None])) is None
    assert injection.packed_boundaries(q, q, torch.ones(1, 8), kw) is None  # a padding mask: not packed
    assert injection.packed_boundaries(q, q[:, :, :1], None, kw) is None  # a KV cache: not packed

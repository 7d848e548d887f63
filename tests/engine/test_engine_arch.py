"""Every supported architecture: the engine's generic decoder equals HF's model.

Tiny random fp32 models, torch ops backend, a left-padded batch of prompts of different lengths.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine, UnsupportedArchitecture
from conftest import TINY_CONFIGS, build_tiny, left_padded_batch, tiny_config, training_logprobs

NEW_TOKENS = 36


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    return request.param, build_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_tokens_equal_hf(tiny):
    name, model = tiny
    ids, mask = left_padded_batch([5, 11, 3, 8], pad_id=0, seed=3)
    # families with separate q/k/v (and gate/up) run with both weight layouts
    fuse = name in ("qwen2", "mistral", "opt", "qwen3", "opt_proj", "gemma2", "stablelm_parallel")
    # 3 rows for 4 prompts: a finished row is refilled with the fourth (continuous batching)
    engine = HybridEngine(model, None, EngineConfig(backend="torch", fuse_projections=fuse, max_batch_size=3))
    ours = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           min_new_tokens=NEW_TOKENS, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert ours.sequences.shape == (4, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(ours.sequences, ref), f"{name}: greedy tokens differ from HF generate"


def test_prefill_logits_match_hf_forward(tiny):
    name, model = tiny
    ids, mask = left_padded_batch([7, 13, 2, 10], pad_id=0, seed=4)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    ours = engine.prefill_logits(ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()  # pad rows are undefined in both
    rel = ((ours[real] - ref[real]).norm() / ref[real].norm()).item()
    assert rel < 1e-5, f"{name}: prefill logits relative error {rel:.2e}"


def test_eos_stops_each_sequence_and_pads_like_hf(tiny):
    name, model = tiny
    ids, mask = left_padded_batch([6, 9, 4], pad_id=0, seed=5)
    # pick an EOS that greedy decoding actually produces for some but not all rows early on
    probe = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                           min_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(probe[0, ids.shape[1] + 2])
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    # two answers per prompt (prompt computed once, blocks shared): greedy, so each is HF's answer
    ours = engine.generate(ids, mask, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                           pad_token_id=0, return_logprobs=True, num_return_sequences=2)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours.sequences[::2], ref) and torch.equal(ours.sequences[1::2], ref)
    ours.sequences, ours.logprobs = ours.sequences[::2], ours.logprobs[::2]
    new = ours.sequences[:, ids.shape[1]:]
    row0 = new[0]
    first = int((row0 == eos).nonzero()[0])
    assert first <= 2
    assert (row0[first + 1:] == 0).all(), "tokens after EOS must be the pad id"
    assert (ours.logprobs[0, first + 1:] == 0).all(), "log-probs after EOS must be 0"
    assert ours.logprobs[0, first] < 0


def test_append_and_continue_equals_generating_from_scratch(tiny):
    """A turn, tokens appended (as a tool's answer would be), a second turn: the same tokens as
    HF greedy on the concatenation, with only the new tokens computed."""
    name, model = tiny
    prompt = left_padded_batch([6], pad_id=0, seed=9)[0][0].tolist()
    # the model's EOS held back for each turn's tokens, as HF's min_new_tokens does (greedy picks it
    # for some tiny models)
    eos = model.generation_config.eos_token_id
    with HybridEngine(model, None, EngineConfig(backend="torch")).session(
            do_sample=False, eos_token_id=[] if eos is None else eos) as s:
        (seq,) = s.start(prompt, max_new_tokens=5, min_new_tokens=5)
        s.run()
        s.append(seq, [7, 30, 41], max_new_tokens=6, min_new_tokens=6)
        s.run()
        ours = s.sequence(seq).tokens
        assert s.runner.prefill_tokens == 6 + 4
    head = torch.tensor([ours[:14]])
    ref = model.generate(input_ids=head, attention_mask=torch.ones_like(head), max_new_tokens=6,
                         min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours == ref[0].tolist(), name


def test_unsupported_architecture_names_supported_ones_and_fallback(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("codegen", n_embd=32, n_layer=1, n_head=4, vocab_size=64, rotary_dim=4)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitecture) as e:
        HybridEngine(model, None, EngineConfig())
    msg = str(e.value)
    assert "codegen" in msg and "llama" in msg and "bloom" in msg and "fallback='hf'" in msg
    # the fallback serves the same interface with plain HF generate
    ids, mask = left_padded_batch([3, 6], vocab=64, pad_id=0)
    engine = HybridEngine(model, None, EngineConfig(fallback="hf"))
    out = engine.generate(ids, mask, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                          pad_token_id=0, return_logprobs=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.logprobs.shape == (2, 5) and (out.logprobs <= 0).all()


def test_cache_is_reused_across_calls_and_released_on_request(tiny):
    name, model = tiny
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    ids, mask = left_padded_batch([4, 7], pad_id=0, seed=6)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    first = engine.generate(ids, mask, **kw).sequences
    cache = engine._cache
    assert cache is not None and cache.allocator.num_used == 0  # every block back in the pool
    # a smaller request reuses the pool; stale blocks from the first call must not leak in
    small_ids, small_mask = ids[:, 3:], mask[:, 3:]
    engine.generate(small_ids, small_mask, **kw)
    assert engine._cache is cache
    again = engine.generate(ids, mask, release_cache=True, **kw).sequences
    assert torch.equal(first, again)
    assert engine._cache is None


@pytest.mark.parametrize("lean", [True, False])
def test_a_window_beyond_the_maximum_position_is_full_attention(tmp_path, monkeypatch, lean):
    """A sliding window longer than the model's positions (or than a request) hides no key: the
    engine accepts it and attends without a window (the paged ops get no `window=`, the CPU lean
    passes build no window mask), token-identical to HF."""
    from fastrlhf.hybrid_engine import attention, decoder
    cfg = tiny_config("mistral")
    cfg.sliding_window = 1000  # > max_position_embeddings = 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    calls = []  # (what, its window): every paged attention op call, or every lean score bias built
    real_resolve, real_bias = decoder.ops.resolve, attention._score_bias

    def spy(op, *a):
        name, fn = real_resolve(op, *a)
        if not op.startswith("paged_attention"):
            return name, fn
        return name, lambda *x, **k: calls.append((op, k.get("window"))) or fn(*x, **k)
    monkeypatch.setattr(decoder.ops, "resolve", spy)
    monkeypatch.setattr(attention, "_score_bias", lambda *a: calls.append(("bias", a[-1])) or real_bias(*a))
    engine = HybridEngine(model, None, EngineConfig(backend="torch", lean_cpu_decode=lean))
    assert engine.spec.layer_windows == (1000, 1000)
    ids, mask = left_padded_batch([9, 4], pad_id=0, seed=9)
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    ours = engine.generate(ids, mask, **kw).sequences
    assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, **kw))
    kinds = {what for what, _ in calls}
    assert kinds == ({"bias"} if lean else {"paged_attention_prefill", "paged_attention_decode"})
    assert len(calls) >= (29 if lean else 2 * 29)  # at least one per decode step (a layer each for the ops)
    assert all(w is None for _, w in calls)


@pytest.mark.parametrize("name,lean", [("gemma3_text", True), ("gemma3_text", False), ("bloom", True),
                                       ("mpt", False), ("gpt_neo", True), ("falcon_alibi", False)])
def test_decode_logprobs_past_the_window_equal_a_full_forward(tiny_models, name, lean):
    """Each decode step past the sliding window (local and global layers with their own rotary
    bases) or with ALiBi gives the log-probs of HF's forward over the whole sequence."""
    model = tiny_models[name]
    ids, mask = left_padded_batch([6, 12, 3], pad_id=0, seed=10)
    out = HybridEngine(model, None, EngineConfig(backend="torch", lean_cpu_decode=lean)).generate(
        ids, mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, return_logprobs=True)
    assert (out.logprobs - training_logprobs(model, out.sequences, mask)).abs().max() < 1e-4


def test_right_padded_prompts_are_rejected_with_the_fix(tiny):
    _, model = tiny
    ids, mask = left_padded_batch([3, 5], pad_id=0)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    with pytest.raises(ValueError, match="LEFT-padded"):
        engine.generate(ids.flip(1), mask.flip(1), max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "opt", "opt_proj", "gemma", "gemma2"])
def test_big_head_decode_path_equals_hf(family, tmp_path, monkeypatch):
    """The CPU decode step computes large lm_heads as W @ h^T; force it on a tiny model."""
    from fastrlhf.hybrid_engine import decoder
    monkeypatch.setattr(decoder, "_BIG_HEAD", 1)
    model = build_tiny(family, tmp_path)
    ids, mask = left_padded_batch([6, 2, 9], pad_id=0, seed=7)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    ours = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           min_new_tokens=NEW_TOKENS, pad_token_id=0, return_logprobs=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.sequences, ref)
    with torch.no_grad():
        logits = model(input_ids=ours.sequences, attention_mask=torch.cat(
            [mask, torch.ones(3, NEW_TOKENS, dtype=mask.dtype)], 1)).logits
    lp = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1)
    ref_lp = lp.gather(-1, ours.sequences[:, ids.shape[1]:, None])[..., 0]
    assert (ours.logprobs - ref_lp).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_qwen_sliding_window_layers_generate_past_the_window_like_hf(name, tmp_path):
    """Qwen2/Qwen3 slide only with use_sliding_window=True, on the layers from max_window_layers on
    (layer_types); generation past the window equals HF's."""
    from fastrlhf.hybrid_engine.arch_spec import spec_for
    cfg = tiny_config(name)
    assert spec_for(cfg).layer_windows == ()
    cfg = type(cfg)(use_sliding_window=True, sliding_window=5, max_window_layers=1, **TINY_CONFIGS[name])
    spec = spec_for(cfg)
    assert spec.family == {"qwen2": "llama", "qwen3": "qwen3"}[name]
    assert spec.layer_windows == (None, 5)
    full = type(cfg)(use_sliding_window=True, sliding_window=5, **TINY_CONFIGS[name],
                     layer_types=["full_attention"] * cfg.num_hidden_layers)
    assert spec_for(full).layer_windows == ()
    if name == "qwen3":
        assert spec.q_norm and spec.k_norm and spec.head_dim == 16
    cfg.initializer_range = 0.25
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask = left_padded_batch([4, 9], pad_id=0, seed=11)
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    ours = HybridEngine(model, None, EngineConfig(backend="torch")).generate(ids, mask, **kw).sequences
    assert torch.equal(ours, model.generate(input_ids=ids, attention_mask=mask, **kw))


def test_phi3_longrope_is_refused_with_the_fallback():
    from fastrlhf.hybrid_engine.arch_spec import spec_for
    cfg = tiny_config("phi3")
    spec = spec_for(cfg)
    assert spec.qkv == "self_attn.qkv_proj" and spec.gate_up == "mlp.gate_up_proj"
    longrope = {"rope_type": "longrope", "type": "longrope", "short_factor": [1.0] * 3,
                "long_factor": [2.0] * 3, "original_max_position_embeddings": 64}
    if hasattr(cfg, "rope_parameters"):  # transformers 5
        cfg.rope_parameters = {**cfg.rope_parameters, **longrope}
    else:
        cfg.rope_scaling = longrope
    with pytest.raises(UnsupportedArchitecture, match="longrope.*fallback='hf'"):
        spec_for(cfg)


def test_gemma_norm_offset_follows_training_updates(tmp_path):
    """Gemma's (1 + w) norm weights are new buffers built at each inference entry: after a
    training step writes the norm parameters, the next generation sees them, and the
    training parameters themselves are never written."""
    model = build_tiny("gemma", tmp_path)
    ids, mask = left_padded_batch([5, 9, 3], pad_id=0, seed=8)
    engine = HybridEngine(model, None, EngineConfig(backend="torch"))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    for step in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ours = engine.prefill_logits(ids, mask)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        assert ((ours[real] - ref[real]).norm() / ref[real].norm()).item() < 1e-5
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} was written by the engine"
        with torch.no_grad():  # an "optimizer step" on every norm weight
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.mul_(-0.7).add_(0.1)


def test_stablelm_per_head_qk_layernorm_is_refused_with_the_fallback():
    from fastrlhf.hybrid_engine.arch_spec import spec_for
    cfg = tiny_config("stablelm")
    spec = spec_for(cfg)
    assert spec.norm == "layer" and spec.rotary_dim == spec.head_dim // 2 and not spec.parallel_residual
    assert spec_for(tiny_config("stablelm_parallel")).post_norm is None
    cfg.qk_layernorm = True
    with pytest.raises(UnsupportedArchitecture, match="qk_layernorm.*fallback='hf'"):
        spec_for(cfg)


def test_gemma2_spec_reads_the_attention_scale_caps_and_window():
    from fastrlhf.hybrid_engine.arch_spec import spec_for
    spec = spec_for(tiny_config("gemma2"))
    assert spec.attn_scale == 24 ** -0.5 and spec.attn_logit_softcap == 2.0
    assert spec.final_logit_softcap == 6.0 and spec.layer_windows == (6, None, 6)
    assert spec.norm_offset == 1.0 and spec.embed_scale == 48 ** 0.5

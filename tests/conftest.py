"""Shared by every test folder: the one GPU-skip rule, the one tolerance table, and the builders
of tiny HF models of every supported family.

- GPU rule: a test marked `@pytest.mark.gpu` (or a module with `pytestmark = pytest.mark.gpu`)
  is skipped, with the reason, on a machine without CUDA; `benchmarks/gpu_suite.sh` runs them.
- `TOL[dtype]`: the relative-norm error ‖out − ref‖ / ‖ref‖ a kernel may have against the fp32
  reference, about two roundings of the output dtype.
- `rel_err`, `left_pad_mask`, `as_fp32`: the comparison helpers the op and kernel tests share.
- Fixtures: `tiny_models` (module-scoped `TinyModels`: each family built once per module, by
  name) and `one_thread` (one intra-op thread for the test: tiny tensors run several times faster
  that way on a shared 2-core machine; use it with `pytestmark = pytest.mark.usefixtures(...)`).
- Tiny models are built from configs with random weights, saved with save_pretrained and loaded
  back by path (the real loading code, no hub). A larger initializer_range than HF's default makes
  the next-token distributions peaked, so greedy comparisons are not decided by near-ties.

Test modules import the builders and TOL with `from conftest import ...` (tests/ is on sys.path
for them, as the rootdir of this conftest).
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from fastrlhf.models.loading import hf_dtype_kwargs

# bf16 eps = 7.8e-3, fp16 eps = 9.8e-4: about two roundings of relative error in the norm
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A GPU compile check in a process that cannot compile (TRITON_INTERPRET=1 set before triton was
    imported: kernels._launch.compile_unavailable) is skipped with the reason, not failed."""
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is not None and type(excinfo[1]).__name__ == "CompileUnavailable":
        outcome.force_exception(pytest.skip.Exception(str(excinfo[1]), _use_item_location=True))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_suite.sh)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


VOCAB = 96
TINY_CONFIGS = {
    "opt": dict(hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                word_embed_proj_dim=48, max_position_embeddings=128, vocab_size=VOCAB,
                pad_token_id=1, bos_token_id=2, eos_token_id=2),
    # opt-350m's shape: embeddings in word_embed_proj_dim (project_in/out), post-norm blocks
    "opt_proj": dict(hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                     word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=128,
                     vocab_size=VOCAB, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "llama": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    # sliding windows: the tests' prompts (up to 13 tokens) and generations (36) run past them
    "mistral": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                    num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=128,
                    sliding_window=7),
    "qwen2": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128),
    # head_dim explicit and != hidden / heads; per-head q/k RMSNorm
    "qwen3": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                  tie_word_embeddings=False),
    "qwen3_tied": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                       tie_word_embeddings=True),
    # fused qkv_proj (GQA) and gate_up_proj; partial rotary; a sliding window
    "phi3": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=9,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # RMSNorm by (1 + w), embeddings * sqrt(hidden), gelu-tanh gated MLP, MQA, tied,
    # head_dim != hidden / heads
    "gemma": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                  hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                  pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # Gemma plus sandwich norms, query_pre_attn_scalar != head_dim, attention and final-logit tanh
    # softcapping (caps small enough to matter at this scale), GQA, sliding window on alternate layers
    "gemma2": dict(hidden_size=48, num_hidden_layers=3, intermediate_size=80, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=6.0,
                   sliding_window=6, hidden_activation="gelu_pytorch_tanh",
                   pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # LayerNorm, partial rotary, q/k/v biases, GQA; and the parallel-residual variant
    "stablelm": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                     partial_rotary_factor=0.5, use_qkv_bias=True, pad_token_id=0, bos_token_id=2,
                     eos_token_id=1),
    "stablelm_parallel": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=80,
                              num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                              max_position_embeddings=128, partial_rotary_factor=0.25,
                              use_parallel_residual=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # biases everywhere, LayerNorm, plain gelu MLP c_fc/c_proj, GQA, tied, a sliding window
    "starcoder2": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                       sliding_window=5, use_bias=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    "gpt_neox": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                     vocab_size=VOCAB, rotary_pct=0.5, max_position_embeddings=128),
    "gpt2": dict(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
    "falcon": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                   max_position_embeddings=128),
    "falcon_new": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                       new_decoder_architecture=True, vocab_size=VOCAB, max_position_embeddings=128,
                       bias=True),
    # mixtures of experts (transformers 5's fused 3-D expert parameters): top-2 of 5, renormalised,
    # fp32 routing weights
    "mixtral": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=40, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, vocab_size=VOCAB,
                    max_position_embeddings=128),
    # a shared expert behind a sigmoid gate, q/k/v biases, top-3 of 6 not renormalised, and a dense
    # MLP layer (mlp_only_layers) among the MoE layers
    "qwen2_moe": dict(hidden_size=48, num_hidden_layers=3, intermediate_size=56, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False,
                      vocab_size=VOCAB, max_position_embeddings=128),
    # per-head q/k norms, head_dim != hidden / heads, top-4 of 8 renormalised
    "qwen3_moe": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=56, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=4,
                      moe_intermediate_size=24, norm_topk_prob=True, vocab_size=VOCAB,
                      max_position_embeddings=128, tie_word_embeddings=False),
    # q/k RMSNorms over all heads' features, q/k/v clamped, top-2 of 8 not renormalised
    "olmoe": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=24, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                  clip_qkv=1.0, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=1,
                  bos_token_id=None, eos_token_id=2),
    # Falcon-RW's shape: ALiBi (no rotary), multi-head, sequential residual, biases
    "falcon_alibi": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                         alibi=True, multi_query=False, parallel_attn=False, bias=True,
                         max_position_embeddings=128),
    # ALiBi with 6 heads (slopes beyond the power of two), embedding LayerNorm, per-head fused QKV
    "bloom": dict(hidden_size=48, n_layer=2, n_head=6, vocab_size=VOCAB, pad_token_id=0, bos_token_id=2,
                  eos_token_id=1),
    # ALiBi with MPT's slopes (6 heads: not a power of two), clip_qkv, bias-free LayerNorms
    "mpt": dict(d_model=48, n_layers=2, n_heads=6, expansion_ratio=2, max_seq_len=128, vocab_size=VOCAB,
                attn_config=dict(clip_qkv=0.6), pad_token_id=0, bos_token_id=2,
                eos_token_id=1),
    # local (window 5, rotary base 100) and global (base 10000, linear rope scaling 2) layers, per-head
    # q/k norms, Gemma-2's sandwich norms, scalar and final softcap, GQA
    "gemma3_text": dict(hidden_size=48, num_hidden_layers=3, intermediate_size=80, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                   query_pre_attn_scalar=24, final_logit_softcapping=6.0, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                       "rope_theta": 10000.0}},
                   pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # head_dim explicit: transformers 5.24's Ministral fails without it
    "ministral": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                      head_dim=12, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      sliding_window=6, layer_types=["full_attention", "sliding_attention"]),
    # weightless LayerNorms, clip_qkv
    "olmo": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, clip_qkv=0.6,
                 pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # output norms instead of input norms, q/k RMSNorms over all heads
    "olmo2": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # OLMo-2 with a sliding (window 6, base 300) and a full (base 10000) layer
    "olmo3": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                  pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # a layer with rotary and one without (NoPE), the latter with a sliding window
    "smollm3": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                    no_rope_layer_interval=2, use_sliding_window=True, sliding_window=6,
                    pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # parallel residual with one LayerNorm, partial rotary, biases (lm_head too), per-head q/k LayerNorms
    "phi": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                vocab_size=VOCAB, max_position_embeddings=128, partial_rotary_factor=0.5, qk_layernorm=True,
                pad_token_id=0, bos_token_id=2, eos_token_id=1),
    # learned positions, no score scaling, a global and a local (window 5) layer
    "gpt_neo": dict(hidden_size=48, num_layers=2, num_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                    attention_types=[[["global", "local"], 1]], window_size=5, bos_token_id=0, eos_token_id=0),
    # multi-query attention in one fused c_attn, learned positions
    "gpt_bigcode": dict(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, pad_token_id=0,
                        bos_token_id=2, eos_token_id=1),
    # embedding, attention, residual and logit multipliers
    "granite": dict(hidden_size=48, num_hidden_layers=2, intermediate_size=80, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                    embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.6,
                    logits_scaling=1.7, pad_token_id=0, bos_token_id=2, eos_token_id=1),
}
FAMILY_OF = {"falcon_new": "falcon", "falcon_alibi": "falcon", "qwen3_tied": "qwen3", "opt_proj": "opt",
             "stablelm_parallel": "stablelm"}
# families whose norm weights are randomised (HF initialises them to ones), so that e.g. a q/k
# norm mix-up changes the logits
RANDOM_NORMS = {"qwen3", "qwen3_tied", "opt_proj", "phi3", "gemma", "gemma2", "stablelm", "stablelm_parallel",
                "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                "bloom", "mpt", "gemma3_text", "olmo2", "olmo3", "phi", "smollm3", "granite"}
# families loaded with eager attention: transformers 4.5x defaults Gemma2 to sdpa, which silently
# drops attn_logit_softcapping (HF's own Gemma2 docs ask for eager)
EAGER = {"gemma2"}


def _phi3_has_partial_rotary() -> bool:  # transformers 4.46's Phi-3 rotates all of head_dim
    cfg = CONFIG_MAPPING["phi3"]()
    return hasattr(cfg, "partial_rotary_factor") or hasattr(cfg, "rope_parameters")


def tiny_config(name: str):
    """The HF config of tiny model `name`; skips the test where this transformers lacks the family
    (e.g. qwen3 before 4.51)."""
    family = FAMILY_OF.get(name, name)
    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family!r} models")
    kw = dict(TINY_CONFIGS[name])
    if family == "phi3" and _phi3_has_partial_rotary():
        kw["partial_rotary_factor"] = 0.5
    return AutoConfig.for_model(family, **kw)


class TinyModels(dict):
    """name -> tiny model, built on first use, so that a family this transformers lacks skips
    only the tests that use it. `prepare(model)` runs once on each."""

    def __init__(self, tmp_path_factory, prepare=None):
        super().__init__()
        self._tmp, self._prepare = tmp_path_factory, prepare

    def __missing__(self, name):
        model = build_tiny(name, self._tmp.mktemp(name))
        if self._prepare is not None:
            self._prepare(model)
        self[name] = model
        return model


def build_tiny(name: str, path, dtype=torch.float32, seed: int = 0, init_std: float = 0.25):
    """A tiny random model of family `name`, saved to `path` and loaded back by path."""
    cfg = tiny_config(name)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if name in RANDOM_NORMS:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n and n.endswith("weight"):
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    kw = dict(attn_implementation="eager") if name in EAGER else {}
    return AutoModelForCausalLM.from_pretrained(str(path), **hf_dtype_kwargs(dtype), **kw).eval()


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected|| in float64; fails on NaN (an unwritten, poisoned element)."""
    out, expected = out.double(), expected.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element or bad masking)"
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def left_pad_mask(lengths, total: int, device="cpu", dtype=torch.long) -> torch.Tensor:
    """[len(lengths), total] attention mask whose row i ends in lengths[i] ones (left padding)."""
    m = torch.zeros(len(lengths), total, dtype=dtype, device=device)
    for i, n in enumerate(lengths):
        if n:
            m[i, total - n:] = 1
    return m


def as_fp32(*ts):
    """The floating tensors among `ts` cast to fp32 (others passed through), for references."""
    return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in ts]


def left_padded_batch(lengths, vocab: int = VOCAB, pad_id: int = 0, seed: int = 1):
    """input_ids [B, max(lengths)] left-padded with pad_id, and the matching attention mask.
    Real tokens avoid ids 0..3 so they never collide with special tokens."""
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.full((len(lengths), p), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), p, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, p - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, p - n:] = 1
    return ids, mask


def no_dropout(model) -> None:
    """Zero every dropout probability of an HF model's config (TinyModels' `prepare` for tests
    that compare training forwards)."""
    for key in ("attn_pdrop", "attention_dropout", "resid_pdrop", "embd_pdrop", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny models of every family, built on first use and shared by the module's tests."""
    return TinyModels(tmp_path_factory)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_ppo_setup(root, n_prompts: int):
    """Step-3 inputs on the bundled tiny task: a policy saved at root/sft and a reward model at
    root/rm (fresh random weights, seeds 1 and 2, each with the tokenizer), and the first
    `n_prompts` prompts of the bundled data as trainer items (prompt, prompt_input_ids).
    Returns (tokenizer, items)."""
    import json

    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.models.reward import RewardModel
    from fastrlhf.tasks.default_task import default_data_path

    tok = load_tokenizer(None, padding_side="left")
    load_causal_lm(None, seed=1).save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    RewardModel.from_pretrained(None, seed=2).save_pretrained(str(root / "rm"))
    tok.save_pretrained(root / "rm")
    with open(default_data_path()) as f:
        rows = [json.loads(line) for _, line in zip(range(n_prompts), f)]
    items = [{"prompt": r["prompt"],
              "prompt_input_ids": tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                          add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)} for r in rows]
    return tok, items


def torchrun(script, nproc: int, *args, timeout: int = 900):
    """Run `script` (a test module's `__main__` worker) under torchrun with `nproc` CPU processes,
    one intra-op thread each, tests/ on the path and the caller's launcher variables removed.
    Returns the CompletedProcess; assert on its returncode with its output."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", FASTRLHF_NO_PROGRESS="1",
               PYTHONPATH=os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), str(script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_generation(got, want, what, lp_tol=1e-5):
    """Two generations as {"seq": token lists, "lp": log-prob lists}: the same tokens, log-probs
    within lp_tol."""
    assert got["seq"] == want["seq"], what
    lp, ref_lp = torch.tensor(got["lp"]), torch.tensor(want["lp"])
    assert lp.shape == ref_lp.shape, what
    assert (lp - ref_lp).abs().max().item() <= lp_tol, what


def training_logprobs(model, sequences, prompt_mask):
    """fp32 log-probs of the generated tokens of `sequences` [B, P + N] (P = prompt_mask's width,
    the prompts left-padded) under the model's training forward, for comparison with a
    generation's `logprobs` [B, N]."""
    p = prompt_mask.shape[1]
    full = torch.cat([prompt_mask, torch.ones_like(sequences[:, p:])], 1)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=full,
                       position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    return torch.log_softmax(logits[:, p - 1:-1].float(), -1).gather(-1, sequences[:, p:, None])[..., 0]


def peft_lora_on_experts(model, target_modules, seed: int = 0):
    """PEFT LoRA on `target_modules` and on the fused 3-D expert parameters of a transformers-5 MoE
    (target_parameters), every B made non-zero (seeded) so that the adapters change the outputs."""
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules),
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(seed + 5)
    peft = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft


def padded_and_packed_logprobs(model, ids, mask):
    """[(log-probs [B, S-1], {name: grad}) padded, then packed] of `model` on a right-padded batch,
    the gradients those of the summed log-probs of the real next tokens, and that real mask."""
    from fastrlhf.rlhf.logprobs import shifted_logprobs
    from fastrlhf.utils.positions import position_ids_from_mask
    real = (mask[:, 1:] * mask[:, :-1]).bool()
    outs = []
    for packed in (False, True):
        model.zero_grad()
        logp = shifted_logprobs(model, ids, mask, position_ids=position_ids_from_mask(mask), packed=packed)
        (logp * real).sum().backward()
        outs.append((logp.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    return outs, real


def run_cli(argv, capsys):
    """`fastrlhf ARGV` in this process, as the console script runs it: (exit status, stdout, stderr).
    A traceback on stderr fails the test (every error is one line)."""
    from fastrlhf import cli
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err[-3000:]
    return rc, out.out, out.err

"""Declarative architecture specs: where each piece of an HF decoder lives and how it behaves.

One generic decoder forward (`decoder.py`) runs every family; a family is a small function
from its HF config to an `ArchSpec`. Adding a family is a spec here plus a test, not code in
the decoder. Module paths are attribute paths relative to the HF `*ForCausalLM` module
(`backbone`) or to one decoder layer (the per-layer names).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class ArchSpec:
    family: str
    # model-level paths (relative to the *ForCausalLM module)
    backbone: str                      # the decoder stack, e.g. "model" or "transformer"
    embed: str                         # relative to backbone
    layers: str                        # relative to backbone, a ModuleList
    final_norm: Optional[str]          # relative to backbone; None when the model has none
    lm_head: str = "lm_head"           # relative to the CausalLM
    pos_embed: Optional[str] = None    # learned positions table, relative to backbone
    pos_offset: int = 0                # OPT adds 2 to every position id
    rotary_module: Optional[str] = None  # HF rotary embedding module, relative to backbone
    project_in: Optional[str] = None   # linear after the token embedding (OPT-350m), relative to backbone
    project_out: Optional[str] = None  # linear before the lm_head, after the final norm (OPT-350m)
    embed_scale: Optional[float] = None  # embeddings times this, cast to the embedding dtype (Gemma)
    embed_norm: Optional[str] = None   # a norm right after the token embedding (Bloom), relative to backbone
    final_logit_softcap: Optional[float] = None  # logits = cap * tanh(logits / cap) (Gemma2)
    logit_divisor: Optional[float] = None  # logits / this (Granite's logits_scaling)
    # per-layer paths
    input_norm: Optional[str] = "input_layernorm"  # None: no norm before attention (OLMo-2 norms outputs)
    post_norm: Optional[str] = None    # None with a shared-norm parallel residual
    q: Optional[str] = None            # separate projections ...
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None          # ... or one fused projection
    qkv_layout: str = "split"          # "split": [q | k | v]; "grouped": [Hkv, group + 2, D]
    q_norm: Optional[str] = None       # per-head norm over head_dim on q / k, before rotary (Qwen3)
    k_norm: Optional[str] = None
    qk_norm_per_head: bool = True      # False: q_norm / k_norm span all heads' features (OLMoE, OLMo-2)
    clip_qkv: Optional[float] = None   # q, k, v clamped to [-clip, clip] after the q/k norms (OLMoE, OLMo, MPT)
    attn_out_norm: Optional[str] = None  # sandwich norms (Gemma2): on the attention output before
    mlp_out_norm: Optional[str] = None   # the residual add, and on the MLP output likewise
    o: str = "o_proj"
    up: Optional[str] = "up_proj"      # None with a fused gate_up
    gate: Optional[str] = None         # gated MLP: act(gate(x)) * up(x)
    gate_up: Optional[str] = None      # ... or one fused [gate | up] projection (Phi-3)
    down: str = "down_proj"
    # numerics
    norm: str = "rms"                  # "rms" | "layer"
    eps: float = 1e-6
    norm_offset: float = 0.0           # RMSNorm scales by (norm_offset + weight): Gemma's 1 + w
    act: str = "silu"                  # an ACT2FN name
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    rotary_dim: int = 0                # 0: no rotary
    attn_scale: Optional[float] = None  # None: head_dim ** -0.5
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) (Gemma2)
    parallel_residual: bool = False    # x + attn(ln1(x)) + mlp(ln2(x)) (ln2 = ln1 when post_norm is None)
    pre_norm: bool = True              # False: OPT-350m style post-norm residual blocks
    residual_multiplier: float = 1.0   # attention and MLP outputs times this before the residual add (Granite)
    max_positions: int = 2048
    moe: Optional["MoESpec"] = None    # a mixture-of-experts MLP (in the layers it names)
    # per-layer attention: one entry per layer, or () when every layer is alike
    layer_windows: Tuple[Optional[int], ...] = ()  # sliding window W: a query at position p sees keys
    #   p - W < k <= p (HF's semantics); None: full attention
    layer_rotary: Tuple[Optional[str], ...] = ()   # the rotary table of each layer: the layer type the HF
    #   rotary module takes (Gemma-3's local and global bases), "" its only table, None no rotary (NoPE)
    alibi_slopes: Optional[Tuple[float, ...]] = None  # ALiBi, per query head: score += slope * (k - p)
    extra: Dict[str, object] = field(default_factory=dict)


# Routers the engine's MoE block implements (hybrid_engine/moe.py):
# "softmax_topk": softmax over all experts' logits (fp32), the k largest probabilities, optionally
# renormalised to sum to 1 (`norm_topk_prob`).
MOE_ROUTERS = ("softmax_topk",)


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP: paths relative to one decoder layer. The experts module holds
    transformers 5's fused 3-D parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]; the
    router module a `weight` [E, H]."""
    router: str                        # e.g. "mlp.gate"
    experts: str                       # e.g. "mlp.experts"
    n_experts: int
    top_k: int
    intermediate: int                  # I, each expert's intermediate width
    norm_topk_prob: bool = False       # renormalise the top-k probabilities to sum to 1
    router_kind: str = "softmax_topk"  # one of MOE_ROUTERS
    # the routing weights are rounded to the model dtype before weighting the experts (Qwen, OLMoE)
    # or kept in fp32 (Mixtral)
    weights_in_model_dtype: bool = True
    shared_expert: Optional[str] = None       # a gated MLP on every token: <path>.gate_proj/up_proj/down_proj
    shared_intermediate: int = 0
    shared_expert_gate: Optional[str] = None  # Linear(H, 1): shared output times sigmoid(gate(x)) (Qwen2-MoE)
    # A layer without a module at `experts` (Qwen-MoE's mlp_only_layers / decoder_sparse_step) runs
    # the dense MLP at the spec's gate/up/down paths.


class UnsupportedArchitecture(ValueError):
    pass


def _layer_windows(c) -> Tuple[Optional[int], ...]:
    """Each layer's sliding window as HF's model applies it, or () when no layer slides. With
    `layer_types` (Qwen2/3, Gemma-2/3, Ministral, OLMo-3, SmolLM3) the layers typed
    "sliding_attention" slide; without it (Mistral, Phi-3, Starcoder2) every layer does. A
    `use_sliding_window` switch (Qwen2/3, SmolLM3; absent elsewhere) that is off turns windows off.
    A window at least as long as a request hides nothing: the decoder passes it to the attention
    ops only when a request is longer (so windows beyond the maximum position are full attention)."""
    sw = getattr(c, "sliding_window", None)
    if sw is None or not getattr(c, "use_sliding_window", True):
        return ()
    types = getattr(c, "layer_types", None)
    if types is None:
        return (int(sw),) * c.num_hidden_layers
    odd = sorted(set(types) - {"sliding_attention", "full_attention"})
    if odd:
        raise UnsupportedArchitecture(f"{c.model_type} layers of type {odd} are not supported by the engine "
                                      "spec (only sliding_attention and full_attention); use "
                                      "EngineConfig(fallback='hf')")
    windows = tuple(int(sw) if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def bloom_alibi_slopes(n_heads: int) -> Tuple[float, ...]:
    """ALiBi slopes as HF's Bloom (and Falcon) computes them, in fp32: the geometric sequence
    r, r^2, .. with r = 2^(-8/n) for the largest power of two n <= n_heads, then for the remaining
    heads the odd powers of the sequence for 2n."""
    import torch
    n = 2 ** math.floor(math.log2(n_heads))

    def odd_or_all(base_heads: int, count: int, step: int):
        base = torch.tensor(2 ** (-(2 ** -(math.log2(base_heads) - 3))), dtype=torch.float32)
        return torch.pow(base, torch.arange(1, 1 + step * count, step, dtype=torch.int32))
    slopes = odd_or_all(n, n, 1)
    if n != n_heads:
        slopes = torch.cat([slopes, odd_or_all(2 * n, min(n, n_heads - n), 2)])
    return tuple(slopes.tolist())


def mpt_alibi_slopes(n_heads: int, bias_max: float = 8) -> Tuple[float, ...]:
    """ALiBi slopes as HF's MPT computes them: 2^(-k * bias_max / n) for k = 1..n, n the power of two
    >= n_heads; with fewer heads, the odd-indexed slopes first, then the even ones, cut to n_heads."""
    import torch
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, dtype=torch.int64).float() * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return tuple(slopes.tolist())


def _rotary_fraction(c) -> float:
    """The rotated fraction of head_dim: transformers 5 keeps it in rope_parameters, 4.x (Phi-4-mini
    era) as an attribute."""
    return (getattr(c, "rope_parameters", None) or {}).get(
        "partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))


def _opt(c) -> ArchSpec:
    # opt-350m: embeddings (and the lm_head) live in word_embed_proj_dim, linears project in and out
    proj = getattr(c, "word_embed_proj_dim", c.hidden_size) != c.hidden_size
    pre = bool(c.do_layer_norm_before)
    final = "final_layer_norm" if pre and not getattr(c, "_remove_final_layer_norm", False) else None
    h = c.num_attention_heads
    return ArchSpec(
        family="opt", backbone="model.decoder", embed="embed_tokens", layers="layers", final_norm=final,
        pos_embed="embed_positions", pos_offset=2, project_in="project_in" if proj else None,
        project_out="project_out" if proj else None, input_norm="self_attn_layer_norm",
        post_norm="final_layer_norm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        o="self_attn.out_proj", up="fc1", down="fc2", norm="layer", eps=1e-5, act=c.activation_function,
        n_heads=h, n_kv_heads=h, head_dim=c.hidden_size // h, pre_norm=pre,
        max_positions=c.max_position_embeddings)


def _llama(c) -> ArchSpec:
    h = c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", None) or h
    hd = getattr(c, "head_dim", None) or c.hidden_size // h
    rope = getattr(c, "rope_parameters", None) or {}
    rd = int(hd * rope.get("partial_rotary_factor", 1.0))
    return ArchSpec(
        family="llama", backbone="model", embed="embed_tokens", layers="layers", final_norm="norm",
        rotary_module="rotary_emb", input_norm="input_layernorm", post_norm="post_attention_layernorm",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", norm="rms",
        eps=getattr(c, "rms_norm_eps", 1e-6),  # OLMo's configs have none (its spec sets its own)
        act=getattr(c, "hidden_act", None) or c.hidden_activation,  # Gemma2 (5.x) has only the latter
        n_heads=h, n_kv_heads=hkv, head_dim=hd, rotary_dim=rd,
        max_positions=c.max_position_embeddings, layer_windows=_layer_windows(c))


def _qwen3(c) -> ArchSpec:
    """Llama plus RMSNorm over head_dim on every q and k head (before rotary); head_dim is
    explicit and need not be hidden_size / heads."""
    spec = _llama(c)
    return ArchSpec(**{**spec.__dict__, "family": "qwen3", "q_norm": "self_attn.q_norm",
                       "k_norm": "self_attn.k_norm"})


def _phi3(c) -> ArchSpec:
    """Llama with one fused [q | k | v] projection (GQA possible) and one fused [gate | up]."""
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type != "default":
        # longrope switches tables with the sequence length inside HF's forward (short factors up
        # to original_max_position_embeddings, long ones beyond), which one table cannot mirror
        raise UnsupportedArchitecture(f"Phi-3 with rope type {rope_type!r} (e.g. the 128k-context "
                                      "models) is not supported by the engine spec; use "
                                      "EngineConfig(fallback='hf')")
    spec = _llama(c)
    factor = _rotary_fraction(c)
    return ArchSpec(**{**spec.__dict__, "family": "phi3", "rotary_dim": int(spec.head_dim * factor),
                       "q": None, "k": None, "v": None,
                       "qkv": "self_attn.qkv_proj", "qkv_layout": "split", "gate": None, "up": None,
                       "gate_up": "mlp.gate_up_proj"})


def _gemma_act(c) -> str:
    """The MLP activation HF's Gemma uses in this transformers release: 4.4x read
    `hidden_activation` (default gelu_pytorch_tanh, `hidden_act` ignored); later releases read
    `hidden_act` (5.x maps the legacy "gelu" to gelu_pytorch_tanh in the config)."""
    import inspect
    try:
        from transformers.models.gemma import modeling_gemma
        src = inspect.getsource(modeling_gemma.GemmaMLP.__init__)
        reads_hidden_activation = "hidden_activation" in src
    except (ImportError, AttributeError, OSError, TypeError):
        reads_hidden_activation = False
    if reads_hidden_activation:
        return getattr(c, "hidden_activation", None) or "gelu_pytorch_tanh"
    return c.hidden_act


def _gemma(c) -> ArchSpec:
    """Llama-shaped with RMSNorm scaling by (1 + w), embeddings times sqrt(hidden_size) (in the
    embedding dtype), a gelu-tanh gated MLP, explicit head_dim, tied lm_head."""
    spec = _llama(c)
    return ArchSpec(**{**spec.__dict__, "family": "gemma", "act": _gemma_act(c), "norm_offset": 1.0,
                       "embed_scale": float(c.hidden_size) ** 0.5})


def _gemma2(c) -> ArchSpec:
    """Gemma plus sandwich norms (post-attention, pre/post feed-forward), attention scale
    query_pre_attn_scalar ** -0.5, tanh softcapping of attention scores and of the final logits,
    and sliding-window attention on alternate layers (`layer_types`)."""
    spec = _llama(c)
    soft = lambda v: None if v is None else float(v)  # noqa: E731
    attn_cap = soft(getattr(c, "attn_logit_softcapping", None))
    if attn_cap is not None and getattr(c, "_attn_implementation", None) == "sdpa":
        import warnings
        warnings.warn("this Gemma2 model runs transformers' sdpa attention, which ignores "
                      f"attn_logit_softcapping={attn_cap}; the engine applies it, so generation and the "
                      "model's own forward differ. Load the model with attn_implementation='eager'.",
                      RuntimeWarning, stacklevel=3)
    act = getattr(c, "hidden_activation", None) or c.hidden_act
    return ArchSpec(**{**spec.__dict__, "family": "gemma2", "act": act, "norm_offset": 1.0,
                       "embed_scale": float(c.hidden_size) ** 0.5, "post_norm": "pre_feedforward_layernorm",
                       "attn_out_norm": "post_attention_layernorm",
                       "mlp_out_norm": "post_feedforward_layernorm",
                       "attn_scale": float(c.query_pre_attn_scalar) ** -0.5,
                       "attn_logit_softcap": attn_cap,
                       "final_logit_softcap": soft(getattr(c, "final_logit_softcapping", None))})


def _stablelm(c) -> ArchSpec:
    """Llama-shaped with LayerNorm (bias), partial rotary, optional q/k/v biases (read from the
    modules) and an optional parallel residual with one shared norm. The per-head q/k
    LayerNorms (qk_layernorm, StableLM-2 12B: a separate norm per head) are refused."""
    if getattr(c, "qk_layernorm", False):
        raise UnsupportedArchitecture("StableLM with qk_layernorm=True (a LayerNorm per head) is not "
                                      "supported by the engine spec; use EngineConfig(fallback='hf')")
    h = c.num_attention_heads
    hd = c.hidden_size // h
    factor = _rotary_fraction(c)
    parallel = bool(getattr(c, "use_parallel_residual", False))
    return ArchSpec(
        family="stablelm", backbone="model", embed="embed_tokens", layers="layers", final_norm="norm",
        rotary_module="rotary_emb", input_norm="input_layernorm",
        post_norm=None if parallel else "post_attention_layernorm",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj", norm="layer", eps=c.layer_norm_eps,
        act=c.hidden_act, n_heads=h, n_kv_heads=c.num_key_value_heads, head_dim=hd,
        rotary_dim=int(hd * factor), parallel_residual=parallel, max_positions=c.max_position_embeddings)


def _starcoder2(c) -> ArchSpec:
    """GQA attention with biases (use_bias), LayerNorm with bias, a plain c_fc/c_proj MLP,
    full rotary, a sliding window on every layer when the config has one."""
    h = c.num_attention_heads
    hd = c.hidden_size // h
    return ArchSpec(
        family="starcoder2", backbone="model", embed="embed_tokens", layers="layers", final_norm="norm",
        rotary_module="rotary_emb", input_norm="input_layernorm", post_norm="post_attention_layernorm",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
        up="mlp.c_fc", down="mlp.c_proj", norm="layer", eps=c.norm_epsilon, act=c.hidden_act,
        n_heads=h, n_kv_heads=c.num_key_value_heads, head_dim=hd, rotary_dim=hd,
        max_positions=c.max_position_embeddings, layer_windows=_layer_windows(c))


def _gpt_neox(c) -> ArchSpec:
    h = c.num_attention_heads
    hd = c.hidden_size // h
    rope = getattr(c, "rope_parameters", None) or {}
    pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    return ArchSpec(
        family="gpt_neox", backbone="gpt_neox", embed="embed_in", layers="layers",
        final_norm="final_layer_norm",
        rotary_module="rotary_emb", input_norm="input_layernorm", post_norm="post_attention_layernorm",
        qkv="attention.query_key_value", qkv_layout="grouped", o="attention.dense",
        up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", norm="layer", eps=c.layer_norm_eps,
        act=c.hidden_act, n_heads=h, n_kv_heads=h, head_dim=hd, rotary_dim=int(hd * pct),
        parallel_residual=bool(c.use_parallel_residual), max_positions=c.max_position_embeddings)


def _gpt2(c) -> ArchSpec:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(c, flag, False):
            raise UnsupportedArchitecture(f"GPT-2 with {flag}=True is not supported by the engine "
                                          "spec; use EngineConfig(fallback='hf')")
    if not getattr(c, "scale_attn_weights", True):
        raise UnsupportedArchitecture("GPT-2 with scale_attn_weights=False is not supported; "
                                      "use EngineConfig(fallback='hf')")
    h = c.n_head
    return ArchSpec(
        family="gpt2", backbone="transformer", embed="wte", layers="h", final_norm="ln_f",
        pos_embed="wpe", input_norm="ln_1", post_norm="ln_2", qkv="attn.c_attn", o="attn.c_proj",
        up="mlp.c_fc", down="mlp.c_proj", norm="layer", eps=c.layer_norm_epsilon,
        act=c.activation_function, n_heads=h, n_kv_heads=h, head_dim=c.n_embd // h,
        max_positions=c.n_positions)


def _falcon(c) -> ArchSpec:
    """Falcon's three attention layouts (new decoder architecture: grouped KV; multi-query; multi-head);
    rotary, or with `alibi=True` (Falcon-RW) ALiBi and no rotary. HF rounds Falcon's slopes to bf16
    and adds the bias before the 1/sqrt(head_dim) scale: the spec's slopes are bf16(slope) /
    sqrt(head_dim). (HF also rounds slope * position to bf16, which a relative bias cannot mirror:
    equal when the slopes are powers of two, i.e. up to 8 heads, and positions < 256.)"""
    h = c.num_attention_heads
    hd = c.hidden_size // h
    new_arch = bool(c.new_decoder_architecture)
    if new_arch:
        hkv = c.num_kv_heads
        layout = "grouped"
        n_ln = getattr(c, "num_ln_in_parallel_attn", None) or 2
        if n_ln == 2:
            in_norm, post = "ln_attn", "ln_mlp"
        else:
            in_norm, post = "input_layernorm", None
        parallel = True
    elif c.multi_query:
        hkv, layout = 1, "split"
        in_norm = "input_layernorm"
        post = None if c.parallel_attn else "post_attention_layernorm"
        parallel = bool(c.parallel_attn)
    else:
        hkv, layout = h, "grouped"
        in_norm = "input_layernorm"
        post = None if c.parallel_attn else "post_attention_layernorm"
        parallel = bool(c.parallel_attn)
    rope = getattr(c, "rope_parameters", None) or {}
    alibi = None
    if getattr(c, "alibi", False):
        import torch
        alibi = tuple(float(torch.tensor(sl).bfloat16()) / math.sqrt(hd) for sl in bloom_alibi_slopes(h))
    return ArchSpec(
        family="falcon", backbone="transformer", embed="word_embeddings", layers="h", final_norm="ln_f",
        rotary_module="rotary_emb", input_norm=in_norm, post_norm=post,
        qkv="self_attention.query_key_value", qkv_layout=layout, o="self_attention.dense",
        up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", norm="layer", eps=c.layer_norm_epsilon,
        act=getattr(c, "activation", "gelu"), n_heads=h, n_kv_heads=hkv, head_dim=hd,
        rotary_dim=0 if alibi else int(hd * rope.get("partial_rotary_factor", 1.0)), parallel_residual=parallel,
        max_positions=getattr(c, "max_position_embeddings", 2048), alibi_slopes=alibi)


def _bloom(c) -> ArchSpec:
    """ALiBi instead of positions, a LayerNorm on the word embeddings, one fused QKV projection laid
    out per head as [q, k, v] (the grouped layout, one query head per group), a GELU-tanh MLP,
    biases everywhere, the lm_head tied to the embedding."""
    if getattr(c, "apply_residual_connection_post_layernorm", False):
        raise UnsupportedArchitecture("Bloom with apply_residual_connection_post_layernorm=True is not "
                                      "supported by the engine spec; use EngineConfig(fallback='hf')")
    h = c.n_head
    return ArchSpec(
        family="bloom", backbone="transformer", embed="word_embeddings", embed_norm="word_embeddings_layernorm",
        layers="h", final_norm="ln_f", input_norm="input_layernorm", post_norm="post_attention_layernorm",
        qkv="self_attention.query_key_value", qkv_layout="grouped", o="self_attention.dense",
        up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", norm="layer", eps=c.layer_norm_epsilon,
        act="gelu_pytorch_tanh",  # Bloom's own tanh GELU, up to the rounding of its constants
        n_heads=h, n_kv_heads=h, head_dim=c.hidden_size // h, alibi_slopes=bloom_alibi_slopes(h))


def _mpt(c) -> ArchSpec:
    """ALiBi with MPT's slopes, fused [q | k | v], optional clip_qkv and softmax scale, LayerNorms
    without bias, a plain GELU MLP, no biases. As HF's MPT does, the config's qk_ln, logit_scale,
    attn_config.alibi and attn_config.alibi_bias_max are not read (HF's slopes use a bias max of 8,
    the value of every published MPT)."""
    a = c.attn_config
    get = (lambda k: a.get(k)) if isinstance(a, dict) else (lambda k: getattr(a, k, None))  # noqa: E731
    h = c.n_heads
    return ArchSpec(
        family="mpt", backbone="transformer", embed="wte", layers="blocks", final_norm="norm_f",
        input_norm="norm_1", post_norm="norm_2", qkv="attn.Wqkv", o="attn.out_proj", up="ffn.up_proj",
        down="ffn.down_proj", norm="layer", eps=c.layer_norm_epsilon, act="gelu", n_heads=h, n_kv_heads=h,
        head_dim=c.d_model // h, attn_scale=get("softmax_scale"), clip_qkv=get("clip_qkv"),
        alibi_slopes=mpt_alibi_slopes(h), max_positions=c.max_seq_len)


def _hf_attention_passes_softcap(module_name: str, class_name: str) -> bool:
    """Whether this transformers release's attention class hands its softcap to the attention
    function (Gemma-3's reads attn_logit_softcapping but, in 5.x, does not pass it on)."""
    import importlib
    import inspect
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{module_name}"), class_name)
        return "softcap=" in inspect.getsource(cls.forward)
    except (ImportError, AttributeError, OSError, TypeError):
        return True


def _gemma3(c) -> ArchSpec:
    """Gemma-2's block (sandwich norms, (1 + w) RMSNorms, scaled embeddings, query_pre_attn_scalar,
    final-logit softcap) with per-head q/k norms, sliding (local) and full (global) layers from
    `layer_types`, each with its own rotary base (HF's rotary module takes the layer type)."""
    if getattr(c, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture("Gemma-3 with use_bidirectional_attention=True (an embedding model) "
                                      "is not a causal LM; the engine does not run it")
    spec = _gemma2(c)
    cap = spec.attn_logit_softcap if _hf_attention_passes_softcap("gemma3.modeling_gemma3",
                                                                   "Gemma3Attention") else None
    return dataclasses.replace(spec, family="gemma3", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                               attn_logit_softcap=cap, layer_rotary=tuple(c.layer_types))


def _olmo(c) -> ArchSpec:
    """Llama with LayerNorms that have no weight and no bias (eps 1e-5) and optional clip_qkv."""
    return dataclasses.replace(_llama(c), family="olmo", norm="layer", eps=1e-5,
                               clip_qkv=getattr(c, "clip_qkv", None))


def _olmo2(c) -> ArchSpec:
    """Llama whose blocks norm their outputs, not their inputs (x + norm(attn(x)), then
    x + norm(mlp(x))), with RMSNorms over the whole q and k projections (all heads at once)."""
    return dataclasses.replace(
        _llama(c), family="olmo2", input_norm=None, post_norm=None, attn_out_norm="post_attention_layernorm",
        mlp_out_norm="post_feedforward_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
        qk_norm_per_head=False)


def _olmo3(c) -> ArchSpec:
    """OLMo-2 with sliding and full layers (`layer_types`), each with its own rotary table."""
    return dataclasses.replace(_olmo2(c), family="olmo3", layer_rotary=tuple(c.layer_types))


def _smollm3(c) -> ArchSpec:
    """Llama where every no_rope_layer_interval-th layer has no rotary (`no_rope_layers[i]` = 0),
    and optional sliding windows (use_sliding_window, on the layers without rotary)."""
    return dataclasses.replace(_llama(c), family="smollm3",
                               layer_rotary=tuple("" if r else None for r in c.no_rope_layers))


def _phi(c) -> ArchSpec:
    """Phi-1/1.5/2: a parallel residual with one shared LayerNorm, q/k/v and dense with biases,
    partial rotary, a plain fc1/fc2 MLP, the lm_head with a bias; qk_layernorm is a LayerNorm per
    head on q and k."""
    h = c.num_attention_heads
    hd = c.hidden_size // h
    factor = _rotary_fraction(c)
    qk = bool(getattr(c, "qk_layernorm", False))
    return ArchSpec(
        family="phi", backbone="model", embed="embed_tokens", layers="layers", final_norm="final_layernorm",
        rotary_module="rotary_emb", input_norm="input_layernorm", post_norm=None,
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense",
        q_norm="self_attn.q_layernorm" if qk else None, k_norm="self_attn.k_layernorm" if qk else None,
        up="mlp.fc1", down="mlp.fc2", norm="layer", eps=c.layer_norm_eps, act=c.hidden_act,
        n_heads=h, n_kv_heads=getattr(c, "num_key_value_heads", None) or h, head_dim=hd,
        rotary_dim=int(hd * factor), parallel_residual=True, max_positions=c.max_position_embeddings)


def _gpt_neo(c) -> ArchSpec:
    """GPT-2-shaped (learned positions, LayerNorm, c_fc/c_proj MLP) with separate q/k/v, no score
    scaling, and global and local layers alternating (`attention_layers`; local = a window of
    window_size)."""
    h = c.num_heads
    return ArchSpec(
        family="gpt_neo", backbone="transformer", embed="wte", layers="h", final_norm="ln_f", pos_embed="wpe",
        input_norm="ln_1", post_norm="ln_2", q="attn.attention.q_proj", k="attn.attention.k_proj",
        v="attn.attention.v_proj", o="attn.attention.out_proj", up="mlp.c_fc", down="mlp.c_proj",
        norm="layer", eps=c.layer_norm_epsilon, act=c.activation_function, n_heads=h, n_kv_heads=h,
        head_dim=c.hidden_size // h, attn_scale=1.0, max_positions=c.max_position_embeddings,
        layer_windows=tuple(int(c.window_size) if t == "local" else None for t in c.attention_layers))


def _gpt_bigcode(c) -> ArchSpec:
    """GPT-2-shaped (learned positions, LayerNorm, c_fc/c_proj MLP) with nn.Linear projections and
    multi-query attention ([q | k | v] with one KV head), or per-head [q, k, v] without it."""
    h = c.num_attention_heads
    mq = bool(c.multi_query)
    return ArchSpec(
        family="gpt_bigcode", backbone="transformer", embed="wte", layers="h", final_norm="ln_f",
        pos_embed="wpe", input_norm="ln_1", post_norm="ln_2", qkv="attn.c_attn",
        qkv_layout="split" if mq else "grouped", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj",
        norm="layer", eps=c.layer_norm_epsilon, act=c.activation_function, n_heads=h,
        n_kv_heads=1 if mq else h, head_dim=c.hidden_size // h,
        attn_scale=None if c.scale_attn_weights else 1.0, max_positions=c.max_position_embeddings)


def _granite(c) -> ArchSpec:
    """Llama with four multipliers: embeddings, attention scores (instead of 1/sqrt(head_dim)),
    the attention and MLP outputs before each residual add, and a divisor on the logits."""
    return dataclasses.replace(_llama(c), family="granite", embed_scale=float(c.embedding_multiplier),
                               attn_scale=float(c.attention_multiplier),
                               residual_multiplier=float(c.residual_multiplier),
                               logit_divisor=float(c.logits_scaling))


# ---------------------------------------------------------------------------------- mixtures of experts

def _experts(c) -> int:
    return getattr(c, "num_experts", None) or c.num_local_experts


def _with_moe(spec: ArchSpec, family: str, moe: MoESpec, **more) -> ArchSpec:
    return ArchSpec(**{**spec.__dict__, "family": family, "moe": moe, **more})


def _mixtral(c) -> ArchSpec:
    """Mistral attention; every layer a MoE (softmax top-k, always renormalised, fp32 weights)."""
    return _with_moe(_llama(c), "mixtral", MoESpec(
        router="mlp.gate", experts="mlp.experts", n_experts=_experts(c), top_k=c.num_experts_per_tok,
        intermediate=c.intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False))


def _qwen_moe(c, base: Callable, family: str) -> ArchSpec:
    """Qwen2-MoE / Qwen3-MoE: softmax top-k (renormalised when norm_topk_prob), dense MLP layers
    where the config says (mlp_only_layers, decoder_sparse_step: those layers have no experts
    module), and (Qwen2-MoE) a shared expert scaled by sigmoid(shared_expert_gate)."""
    e = _experts(c)
    shared = int(getattr(c, "shared_expert_intermediate_size", 0) or 0)
    return _with_moe(base(c), family, MoESpec(
        router="mlp.gate", experts="mlp.experts", n_experts=e, top_k=c.num_experts_per_tok,
        intermediate=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
        shared_expert="mlp.shared_expert" if shared else None, shared_intermediate=shared,
        shared_expert_gate="mlp.shared_expert_gate" if shared else None))


def _olmoe(c) -> ArchSpec:
    """Llama-shaped attention with RMSNorms over all q (k) heads' features together, an optional
    clamp of q/k/v, and a MoE in every layer."""
    return _with_moe(_llama(c), "olmoe", MoESpec(
        router="mlp.gate", experts="mlp.experts", n_experts=_experts(c), top_k=c.num_experts_per_tok,
        intermediate=c.intermediate_size, norm_topk_prob=bool(c.norm_topk_prob)),
        q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", qk_norm_per_head=False,
        clip_qkv=None if c.clip_qkv is None else float(c.clip_qkv))


# MoE families transformers ships whose routers (or attention) the engine does not implement:
# model_type -> why. spec_for names the reason and the supported routers.
MOE_REFUSED: Dict[str, str] = {
    "phimoe": "PhiMoE routes with sparsemixer (masked, jittered top-2 gates)",
    "granitemoe": "GraniteMoE routes with softmax over the top-k logits and needs Granite's embedding/"
                  "residual/logit multipliers",
    "granitemoeshared": "GraniteMoE-Shared routes with softmax over the top-k logits and needs Granite's "
                        "embedding/residual/logit multipliers",
    "ernie4_5_moe": "ERNIE-4.5-MoE selects experts by softmax plus a score-correction bias",
    "glm4_moe": "GLM-4-MoE routes with sigmoid scores, grouped top-k and a score-correction bias",
    "deepseek_v2": "DeepSeek-V2 routes with grouped top-k (and uses multi-head latent attention)",
    "deepseek_v3": "DeepSeek-V3 routes with sigmoid scores, grouped top-k and a score-correction bias "
                   "(and uses multi-head latent attention)",
    "dbrx": "DBRX normalises the top-k weights by a p-norm and fuses its attention differently",
    "jetmoe": "JetMoE routes attention heads too (mixture of attention heads)",
    "hunyuan_v1_moe": "HunYuan-MoE routes with a per-layer top-k",
    "gpt_oss": "gpt-oss routes with softmax over the top-k logits into biased, clamped experts and uses "
               "attention sinks",
    "qwen3_next": "Qwen3-Next mixes linear-attention (gated DeltaNet) layers in",
    "llama4": "Llama 4 routes with a sigmoid over the top-1 logit and uses chunked attention",
    "jamba": "Jamba mixes Mamba layers in",
    "minimax": "MiniMax mixes lightning-attention layers in",
}


# model_type -> spec builder. Mistral, Qwen2 and Ministral are Llama-shaped (GQA; Qwen2 has q/k/v
# biases, which the generic decoder picks up from the modules themselves; windows per layer).
SPEC_BUILDERS: Dict[str, Callable] = {
    "opt": _opt,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "stablelm": _stablelm,
    "starcoder2": _starcoder2,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "falcon": _falcon,
    "mixtral": _mixtral,
    "qwen2_moe": lambda c: _qwen_moe(c, _llama, "qwen2_moe"),
    "qwen3_moe": lambda c: _qwen_moe(c, _qwen3, "qwen3_moe"),
    "olmoe": _olmoe,
    "bloom": _bloom,
    "mpt": _mpt,
    "gemma3_text": _gemma3,
    "ministral": _llama,
    "olmo": _olmo,
    "olmo2": _olmo2,
    "olmo3": _olmo3,
    "smollm3": _smollm3,
    "phi": _phi,
    "gpt_neo": _gpt_neo,
    "gpt_bigcode": _gpt_bigcode,
    "granite": _granite,
}


def moe_families() -> Tuple[str, ...]:
    return ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def check_moe(spec: ArchSpec) -> ArchSpec:
    """UnsupportedArchitecture for a MoE spec whose router the engine does not implement."""
    moe = spec.moe
    if moe is not None and spec.act != "silu":
        raise UnsupportedArchitecture(f"{spec.family}: experts with activation {spec.act!r} are not implemented "
                                      "by the engine's fused MoE (silu only); use EngineConfig(fallback='hf')")
    if moe is not None and moe.router_kind not in MOE_ROUTERS:
        raise UnsupportedArchitecture(
            f"{spec.family}: the MoE router {moe.router_kind!r} is not implemented by the engine; supported "
            f"routers: {', '.join(MOE_ROUTERS)} (families {', '.join(moe_families())}). Use "
            "EngineConfig(fallback='hf')")
    return spec


def supported_model_types() -> Tuple[str, ...]:
    return tuple(sorted(SPEC_BUILDERS))


def spec_for(config) -> ArchSpec:
    """The ArchSpec of an HF config, or a clear error naming the supported types and the fallback."""
    mt = getattr(config, "model_type", None)
    builder = SPEC_BUILDERS.get(mt)
    if builder is None and mt in MOE_REFUSED:
        raise UnsupportedArchitecture(
            f"HybridEngine does not support the mixture-of-experts model_type={mt!r}: {MOE_REFUSED[mt]}. "
            f"Supported MoE routers: {', '.join(MOE_ROUTERS)} (softmax over all experts, top-k, optionally "
            f"renormalised), in the families {', '.join(moe_families())}. Pass EngineConfig(fallback='hf') "
            "to run plain HF generate through the same interface.")
    if builder is None:
        raise UnsupportedArchitecture(
            f"HybridEngine has no architecture spec for model_type={mt!r}; supported: "
            f"{', '.join(supported_model_types())}. Pass EngineConfig(fallback='hf') to run plain "
            "HF generate through the same interface.")
    return check_moe(builder(config))

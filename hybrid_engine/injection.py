"""`fastrlhf.inject(model)`: an unmodified HF model runs its training forward on fastrlhf.ops.

Attention goes through the transformers attention interface: we register an attention
function "fastrlhf" (calling ops.attention_prefill, which handles GQA, left/right padding,
the bottom-right causal alignment of a KV cache, sliding windows and softcapping) and a matching
mask function that hands it the 2-D padding mask instead of a materialised 4-D mask. Packed
batches (HF's padding-free convention: no mask, position_ids restarting inside a row) run as
packed attention (ops' cu_seqlens). RMSNorm / LayerNorm modules are
replaced by thin modules calling ops.rms_norm / ops.layer_norm that keep the SAME weight
Parameters (so optimizers, ZeRO partitioning and state-dict keys are unchanged). LoRA layers
(PEFT or fastrlhf) are untouched: they sit on the linear layers, which this does not replace.

With `generate=True`, `model.generate(...)` runs through the hybrid engine (`EngineGenerate`) for
the arguments the engine implements, and through HF's own `generate` otherwise.
"""
from __future__ import annotations

import sys
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastrlhf import ops

ATTN_NAME = "fastrlhf"
# RMSNorm classes whose forward is x * rsqrt(mean(x^2) + eps) * weight
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "OlmoRMSNorm",
                    "Phi3RMSNorm", "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "OlmoeRMSNorm",
                    "MinistralRMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm", "Olmo2RMSNorm", "Olmo3RMSNorm")
# ... and those scaling by (1 + weight), computed in fp32 (Gemma, Gemma2, Gemma3)
RMS_NORM_PLUS_ONE_CLASSES = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
# LayerNorms with neither weight nor bias, eps 1e-5 (OLMo)
PLAIN_LAYER_NORM_CLASSES = ("OlmoLayerNorm",)


def fastrlhf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs):
    """HF attention-interface function: q [B, Hq, S, D], k/v [B, Hkv, Sk, D] -> ([B, S, Hq, D], None).

    Passes on what the model gives the interface: `sliding_window` (Mistral, Qwen2, Gemma2/3, ...)
    as the ops' `window`, `softcap` (Gemma2). Sequences packed into rows (HF's padding-free
    convention: no attention mask, position_ids restarting inside a row, e.g.
    DataCollatorWithFlattening; or its `cu_seq_lens_q` kwargs) run as packed attention
    (`cu_seqlens`): no token attends across a boundary, as in HF's own attention.
    """
    if dropout and module.training:
        raise NotImplementedError(
            f"fastrlhf attention has no dropout, but {type(module).__name__} asks for p={dropout}; set the "
            f"model's {_dropout_setting(module, dropout)} to 0.0 (or call model.eval(), or do not inject)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("fastrlhf attention expects a 2-D padding mask; the model built a "
                         f"{attention_mask.dim()}-D one (was the fastrlhf mask function replaced?)")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if causal is None:
        causal = True
    rules = dict(scale=scaling, softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window"))
    cu_seqlens = packed_boundaries(query, key, attention_mask, kwargs)
    if cu_seqlens is None:
        out = ops.attention_prefill(query, key, value, causal=bool(causal), attention_mask=attention_mask, **rules)
        return out.transpose(1, 2).contiguous(), None
    b, hq, s, d = query.shape
    # the rows of the batch end to end as one packed row (a row's end is a boundary too)
    one_row = [t.transpose(0, 1).reshape(1, t.shape[1], b * s, d) for t in (query, key, value)]
    out = ops.attention_prefill(*one_row, causal=bool(causal), cu_seqlens=cu_seqlens, **rules)
    return out.reshape(hq, b, s, d).permute(1, 2, 0, 3).contiguous(), None


def packed_boundaries(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """cu_seqlens (int32, over the batch's rows end to end) when the interface call carries packed
    sequences, else None. As in transformers: only without a padding mask and without a KV cache
    (queries = keys); from `cu_seq_lens_q` (one row) when the data collator passed it, else from
    `position_ids`, where a sequence starts wherever a position is not its predecessor + 1 (HF's
    `find_packed_sequence_indices` rule)."""
    if attention_mask is not None or key.shape[2] != query.shape[2] or query.shape[2] < 2:
        return None
    b, s = query.shape[0], query.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and b == 1:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and not torch.equal(cu_k, cu):
            raise ValueError("fastrlhf attention: cu_seq_lens_k differs from cu_seq_lens_q; packed attention here "
                             "is self-attention over one packed row (pass equal boundaries)")
        return cu.to(device=query.device, dtype=torch.int32)
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[-1] != s:
        return None
    return _boundaries_from_positions(positions, b, query.device)


# The same position_ids tensor reaches every layer of one forward: its boundaries are computed once.
_boundary_cache: Dict[str, Any] = {"ref": None, "version": None, "cu": None}


def _boundaries_from_positions(position_ids: torch.Tensor, batch: int, device) -> Optional[torch.Tensor]:
    cache = _boundary_cache
    ref = cache["ref"]
    key = (position_ids._version, batch, str(device))
    if ref is not None and ref() is position_ids and cache["version"] == key:
        return cache["cu"]
    positions = position_ids.to(device).expand(batch, position_ids.shape[-1])
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    cu = None
    if bool(starts[:, 1:].any()):  # restarts inside a row: packed (one device sync per forward)
        first = starts.reshape(-1).nonzero().reshape(-1).to(torch.int32)
        cu = torch.cat([first, first.new_tensor([positions.numel()])])
    cache.update(ref=weakref.ref(position_ids), version=key, cu=cu)
    return cu


def _dropout_setting(module: nn.Module, p: float) -> str:
    """The config field the model's attention dropout comes from, as the model names it (GPT-2:
    attn_pdrop, Llama: attention_dropout, ...), with its value."""
    config = getattr(module, "config", None)
    names = [k for k, v in vars(config).items() if "drop" in k and "att" in k and v == p] if config is not None else []
    return f"{names[0]} (now {p:g})" if names else f"attention dropout setting (now {p:g})"


def _refuse_empty_inputs(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook of an injected model: HF's own error for an empty batch is a reshape deep inside."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[0] * ids.shape[1] == 0:
        raise ValueError(f"empty inputs (shape ({ids.shape[0]}, {ids.shape[1]})): pass at least one sequence of "
                         "at least one token")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_NAME, fastrlhf_attention)
    # flash-style masks: None when nothing is padded, else the 2-D [B, kv_len] padding mask
    AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


MIN_TRANSFORMERS_FOR_ATTENTION = "4.54"  # AttentionMaskInterface + PreTrainedModel.set_attn_implementation
# families whose 4.x attention cannot run on a 2-D padding mask: OPT builds its own 4-D mask, GPT-2
# (4.55-4.57) passes is_causal=False whenever there is a mask (which would then have to carry causality)
ATTENTION_NEEDS_TRANSFORMERS_5 = ("gpt2", "opt")


def _attention_not_injectable(hf: nn.Module) -> Optional[str]:
    """Why the attention of `hf` cannot be routed to fastrlhf, or None when it can."""
    import transformers
    from packaging.version import Version
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: F401
        old = not hasattr(hf, "set_attn_implementation")
    except ImportError:
        old = True
    if old:
        return (f"attention injection needs transformers >= {MIN_TRANSFORMERS_FOR_ATTENTION} (its attention "
                f"and attention-mask interfaces); this is transformers {transformers.__version__}")
    if not getattr(hf, "_supports_attention_backend", False):
        return f"{type(hf).__name__} does not route attention through the transformers attention interface"
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type in ATTENTION_NEEDS_TRANSFORMERS_5 and Version(transformers.__version__).major < 5:
        return (f"{model_type} attention injection needs transformers >= 5.0 (its 4.x attention does not "
                f"take a 2-D padding mask); this is transformers {transformers.__version__}")
    modeling = sys.modules.get(type(hf).__module__)
    if modeling is not None and not hasattr(modeling, "create_causal_mask"):
        # a model that builds its own 4-D mask (as OPT and GPT-2 did in 4.x) would not get ours
        return (f"{type(hf).__name__} builds its own 4-D attention mask in transformers "
                f"{transformers.__version__} instead of asking the attention-mask interface (newer "
                "transformers releases do)")
    return None


class FastRMSNorm(nn.Module):
    """ops.rms_norm with the module's weight; `offset` 1.0 scales by (1 + weight) in fp32 (Gemma)."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return ops.rms_norm(x, self.weight.float() + self.offset, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


class FastLayerNorm(nn.Module):
    def __init__(self, weight: Optional[nn.Parameter], bias: Optional[nn.Parameter], eps: float):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def _replacement(module: nn.Module) -> Optional[nn.Module]:
    name = type(module).__name__
    if name in RMS_NORM_CLASSES:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        return FastRMSNorm(module.weight, eps)
    if name in RMS_NORM_PLUS_ONE_CLASSES:
        return FastRMSNorm(module.weight, getattr(module, "eps", 1e-6), offset=1.0)
    if name in PLAIN_LAYER_NORM_CLASSES:
        return FastLayerNorm(None, None, 1e-5)
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return FastLayerNorm(module.weight, module.bias, module.eps)
    return None


def inject(model: nn.Module, *, attention: bool = True, norms: bool = True, generate: bool = False,
           engine_config=None) -> nn.Module:
    """Make `model` (HF, PEFT-wrapped, fastrlhf-LoRA, or a DeepSpeed engine) use fastrlhf ops in
    its forward; with generate=True, also route `model.generate` through the hybrid engine
    (configured by `engine_config`, an EngineConfig). Returns the same object. Idempotent."""
    from transformers import PreTrainedModel

    from .engine import unwrap_model

    hf = unwrap_model(model)
    if not isinstance(hf, PreTrainedModel):
        raise TypeError(f"inject() takes a transformers model (a PreTrainedModel, plain, PEFT-wrapped or in a "
                        f"DeepSpeed engine); got a {type(hf).__name__}")
    if generate:
        from .arch_spec import spec_for
        spec_for(hf.config)  # an unsupported family fails here, naming the supported ones
    if attention:
        why = _attention_not_injectable(hf)
        if why:
            raise NotImplementedError(f"{why}, so fastrlhf cannot inject its attention; call "
                                      "inject(model, attention=False) to replace only the norms")
        _register()
        hf.set_attn_implementation(ATTN_NAME)
        if hf.config._attn_implementation != ATTN_NAME:
            raise RuntimeError(f"transformers refused attn_implementation={ATTN_NAME!r} for "
                               f"{type(hf).__name__}")
    if not getattr(hf, "_fastrlhf_refuses_empty", False):
        hf.register_forward_pre_hook(_refuse_empty_inputs, with_kwargs=True)
        hf._fastrlhf_refuses_empty = True
    if norms:
        for parent in list(hf.modules()):
            for child_name, child in list(parent.named_children()):
                new = _replacement(child)
                if new is not None:
                    setattr(parent, child_name, new)
    if generate:
        current = hf.__dict__.get("generate")
        if isinstance(current, EngineGenerate):
            if engine_config is not None:
                current.engine_config, current._engine = engine_config, None
        else:
            hf.generate = EngineGenerate(hf, engine_config)
    return model


# ---------------------------------------------------------------------------------------------
# model.generate through the hybrid engine

# generate() arguments the engine implements (with HF's meaning); any other argument that is not
# None, or a generation-config field set to a value the engine does not implement, sends the
# call to HF's generate with a one-time log line naming it
ENGINE_ARGS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature",
               "top_k", "top_p", "eos_token_id", "pad_token_id", "return_dict_in_generate", "use_cache",
               "num_return_sequences")
# generation-config fields with no effect on greedy / sampled decoding without beams or an assistant
NO_EFFECT_FIELDS = ("bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
                    "early_stopping", "length_penalty", "num_assistant_tokens", "num_assistant_tokens_schedule",
                    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
                    "cache_implementation", "cache_config", "compile_config", "disable_compile", "is_assistant",
                    "diversity_penalty", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty")


def _same(value, default) -> bool:
    return value == default or (value in (None, False) and default in (None, False))


class EngineGenerate:
    """The `generate` that `inject(model, generate=True)` installs on the HF model.

    Greedy and sampled decoding (temperature, top-k, top-p), max/min new tokens (or max/min
    length), num_return_sequences (sampling; each prompt computed once, its answers in HF's order),
    eos/pad ids, a left-padded attention_mask and return_dict_in_generate run in the
    hybrid engine, with HF's defaults (the model's generation_config, then transformers'
    global defaults) and HF's output types. Randomness comes from torch's global generator, so
    `torch.manual_seed(s)` makes sampling reproducible. Anything else goes to HF's generate.
    The engine only reads the training weights: parameters, requires_grad, train/eval modes
    and optimizer state are the same after a call. Its KV cache is kept for the next call (as
    the engine does in PPO); `model.generate.engine().release_cache()` frees it.
    """

    def __init__(self, hf: nn.Module, engine_config=None):
        self.hf = hf
        self.engine_config = engine_config
        self._engine = None
        self._logged: set = set()

    def _hf(self, reason: str, args, kwargs):
        if reason not in self._logged:
            self._logged.add(reason)
            from fastrlhf.utils.logging import get_logger
            get_logger().info(f"fastrlhf.inject(generate=True): the hybrid engine does not implement "
                              f"{reason}; model.generate runs HF's generate for such calls")
        return type(self.hf).generate(self.hf, *args, **kwargs)

    def __call__(self, inputs: Optional[torch.Tensor] = None, *args, **kwargs):
        ids = kwargs.get("input_ids") if inputs is None else inputs
        fwd_args = ((inputs,) if inputs is not None else ()) + args
        plan, reason = self._plan(ids, args, kwargs)
        if plan is None:
            return self._hf(reason, fwd_args, kwargs)
        return self._run(plan)

    def _settings(self, kwargs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        from transformers import GenerationConfig

        defaults = GenerationConfig._get_default_generation_params() \
            if hasattr(GenerationConfig, "_get_default_generation_params") else GenerationConfig().to_dict()
        base = kwargs.get("generation_config") or self.hf.generation_config
        settings = dict(defaults)
        settings.update({k: v for k, v in base.to_dict().items() if v is not None})
        settings.update({k: v for k, v in kwargs.items() if v is not None and k in ENGINE_ARGS})
        return settings, defaults

    def _plan(self, ids, args, kwargs) -> Tuple[Optional[Dict[str, Any]], str]:
        if args:
            return None, f"positional arguments after the inputs ({len(args)} given)"
        for k, v in kwargs.items():
            if v is not None and k not in ENGINE_ARGS + ("input_ids", "attention_mask", "generation_config"):
                return None, f"the argument {k!r}"
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            return None, "inputs other than a [batch, length] tensor of token ids"
        if ids.numel() == 0:
            raise ValueError(f"model.generate: empty inputs (shape ({ids.shape[0]}, {ids.shape[1]})): pass at "
                             "least one prompt of at least one token")
        s, defaults = self._settings(kwargs)
        if s.get("do_sample") and not (s.get("temperature") is None or s["temperature"] > 0):
            raise ValueError(f"`temperature` (={s['temperature']}) has to be a strictly positive float when "
                             "sampling, as in HF's generate; for greedy decoding set do_sample=False")
        for k, v in s.items():
            if k not in ENGINE_ARGS and k not in NO_EFFECT_FIELDS and not _same(v, defaults.get(k)):
                return None, f"generation_config.{k}={v!r}"
        if kwargs.get("use_cache") is False:  # asked for; a config's use_cache=False (MPT's) is a
            return None, "use_cache=False"    # training-memory default, with the same tokens
        eos = s.get("eos_token_id")
        eos_ids: List[int] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        pad = s.get("pad_token_id")
        if pad is None and eos_ids:
            pad = eos_ids[0]  # as HF does (it warns)
        mask = kwargs.get("attention_mask")
        if mask is None:  # HF's rule: pad tokens in the inputs are padding unless pad is an EOS
            if pad is not None and bool((ids == pad).any()) and pad not in eos_ids:
                mask = (ids != pad).long()
            else:
                mask = torch.ones_like(ids)
        if mask.shape != ids.shape or not bool(mask[:, -1].all()):
            return None, "right-padded attention_mask (the engine takes left-padded prompts)"
        if not bool(mask.any(dim=-1).all()):
            return None, "rows with no real token"
        p = ids.shape[1]
        max_new = s.get("max_new_tokens")
        if max_new is None:
            max_new = s["max_length"] - p
        if max_new < 1:
            return None, f"a max_length ({s.get('max_length')}) that leaves no new token after {p} prompt tokens"
        min_new = max(int(s.get("min_new_tokens") or 0), int(s.get("min_length") or 0) - p)
        if pad is None:
            return None, "no pad_token_id and no eos_token_id"
        do_sample = bool(s.get("do_sample"))
        group = int(s.get("num_return_sequences") or 1)
        if group > 1 and not do_sample:
            return None, "num_return_sequences > 1 with greedy decoding (HF refuses it)"
        return dict(input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new), min_new_tokens=max(0, min_new),
                    num_return_sequences=group,
                    do_sample=do_sample, temperature=float(s["temperature"]) if do_sample and s.get("temperature")
                    is not None else 1.0,
                    top_k=int(s.get("top_k") or 0) if do_sample else 0,
                    top_p=float(s.get("top_p") or 1.0) if do_sample else 1.0,
                    eos_token_id=eos_ids, pad_token_id=int(pad),
                    return_dict=bool(s.get("return_dict_in_generate"))), ""

    def engine(self):
        if self._engine is None:
            from .engine import HybridEngine
            self._engine = HybridEngine(self.hf, None, self.engine_config)
        return self._engine

    def _run(self, plan: Dict[str, Any]):
        return_dict = plan.pop("return_dict")
        device = plan["input_ids"].device
        out = self.engine().generate(generator=None, **plan)  # None: torch's global generator
        sequences = out.sequences.to(device)
        if not return_dict:
            return sequences
        from transformers.generation.utils import GenerateDecoderOnlyOutput
        return GenerateDecoderOnlyOutput(sequences=sequences)

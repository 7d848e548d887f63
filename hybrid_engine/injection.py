"""`fastrlhf.inject(model)`: an unmodified HF model runs its training forward on fastrlhf.ops.

Attention goes through the transformers attention interface: we register an attention
function "fastrlhf" (calling ops.attention_prefill, which handles GQA, left/right padding and
the bottom-right causal alignment of a KV cache) and a matching mask function that hands it
the 2-D padding mask instead of a materialised 4-D mask. RMSNorm / LayerNorm modules are
replaced by thin modules calling ops.rms_norm / ops.layer_norm that keep the SAME weight
Parameters (so optimizers, ZeRO partitioning and state-dict keys are unchanged). LoRA layers
(PEFT or fastrlhf) are untouched: they sit on the linear layers, which this does not replace.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from fastrlhf import ops

ATTN_NAME = "fastrlhf"
# RMSNorm classes whose forward is x * rsqrt(mean(x^2) + eps) * weight
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "OlmoRMSNorm",
                    "Phi3RMSNorm")
# ... and those scaling by (1 + weight), computed in fp32 (Gemma, Gemma2)
RMS_NORM_PLUS_ONE_CLASSES = ("GemmaRMSNorm", "Gemma2RMSNorm")


def fastrlhf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs):
    """HF attention-interface function: q [B, Hq, S, D], k/v [B, Hkv, Sk, D] -> ([B, S, Hq, D], None)."""
    if dropout and module.training:
        raise NotImplementedError(
            f"fastrlhf attention has no dropout, but {type(module).__name__} asks for p={dropout}; "
            "set the model's attention_dropout to 0.0 (or do not inject)")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise NotImplementedError(f"sliding-window attention (window {window} < {key.shape[2]} keys) "
                                  "is not supported by fastrlhf ops; do not inject this model")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("fastrlhf attention expects a 2-D padding mask; the model built a "
                         f"{attention_mask.dim()}-D one (was the fastrlhf mask function replaced?)")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if causal is None:
        causal = True
    out = ops.attention_prefill(query, key, value, causal=bool(causal), attention_mask=attention_mask,
                                scale=scaling, softcap=kwargs.get("softcap"))  # Gemma2 passes softcap
    return out.transpose(1, 2).contiguous(), None


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
    if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1:
        return FastLayerNorm(module.weight, module.bias, module.eps)
    return None


def inject(model: nn.Module, *, attention: bool = True, norms: bool = True) -> nn.Module:
    """Make `model` (HF, PEFT-wrapped, fastrlhf-LoRA, or a DeepSpeed engine) use fastrlhf ops in
    its forward. Returns the same object. Idempotent."""
    from .engine import unwrap_model

    hf = unwrap_model(model)
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
    if norms:
        for parent in list(hf.modules()):
            for child_name, child in list(parent.named_children()):
                new = _replacement(child)
                if new is not None:
                    setattr(parent, child_name, new)
    return model

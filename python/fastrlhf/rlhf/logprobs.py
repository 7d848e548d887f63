"""The one definition of "log-probs of given tokens under a causal LM" that every trainer uses
(SFT's loss, PPO/GRPO/RLOO actor and reference log-probs, DPO).

The model body gives the final hidden states and `fastrlhf.ops.token_logprobs` applies the
output embedding to them chunk by chunk, so the [tokens, vocab] logits are never materialised in
fp32 (for a 150k vocabulary they are RLHF's largest tensor). Only the rows that are scored are
passed on (SFT's labelled tokens, PPO's answer columns).

A model whose logits are not plain `lm_head(hidden)` is scored through its full HF forward
instead, with the reason logged once: final-logit softcapping (Gemma2), logit scaling, an lm_head
with a bias or wrapped by an adapter, ZeRO-3-partitioned weights, or a family not known to have
this shape. Both paths give the same numbers: log_softmax in fp32, ignored labels (-100) give 0.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import ops
from ..models.packed_attention import packed_attention, stands_in
from ..utils.packing import PackedRows
from . import rl_math as M
from .ds_engine import is_partitioned

# HF model types whose CausalLM forward is logits = lm_head(base_model(...).last_hidden_state)
PLAIN_HEAD_MODEL_TYPES = ("bloom", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo",
                          "gpt_neox", "granite", "llama", "ministral", "mistral", "mixtral", "mpt", "olmo", "olmo2",
                          "olmo3", "olmoe", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                          "smollm3", "stablelm", "starcoder2")
# config attributes that change the logits after the lm_head product
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
IGNORE_INDEX = -100
_logged: set = set()


def fused_parts(model: nn.Module) -> Tuple[Optional[Tuple[nn.Module, nn.Linear]], str]:
    """((body, lm_head), "") when `model`'s log-probs can come from ops.token_logprobs, else
    (None, the reason they cannot)."""
    from ..hybrid_engine.engine import unwrap_model

    hf = unwrap_model(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None, (f"{type(hf).__name__} (model_type {model_type!r}) is not a family known to compute its "
                      f"logits as lm_head(hidden states) ({', '.join(PLAIN_HEAD_MODEL_TYPES)})")
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None, f"{model_type} transforms its logits after the lm_head ({name}={getattr(config, name)})"
    head = hf.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None, (f"the output embedding is a {type(head).__name__}, not a plain nn.Linear (an adapter "
                      "on the lm_head?)")
    if head.bias is not None:
        return None, "the lm_head has a bias"
    if is_partitioned(head.weight):
        return None, "the lm_head weight is ZeRO-3 partitioned"
    body = hf.base_model
    if body is hf:
        return None, f"{type(hf).__name__} has no separate base model"
    return (body, head), ""


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        from ..utils.logging import print_rank0
        print_rank0(f"log-probs through the full HF forward (fused token_logprobs off): {reason}")


def shifted_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                     start: int = 0, with_entropy: bool = False, fused: Optional[bool] = None,
                     packed: bool = False, shared_prefix: int = 0
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """log p(labels[:, c + 1] | tokens <= c) for columns c = start .. S-2: [B, S - 1 - start], fp32.

    labels default to input_ids; label -100 gives 0 (and entropy 0). With with_entropy, also the
    entropy of each of those next-token distributions. fused=None picks the fused op whenever the
    model allows it (`fused_parts`); False forces the full HF forward (for comparisons).
    packed=True runs the model on the real tokens only, packed into one row (`utils.packing`; the
    positions are those of `position_ids_from_mask`): the same numbers wherever a real token
    predicts a real token, 0 where the padded forward would have scored padding. With packed and
    shared_prefix P, rows whose first P columns are equal (a group's prompt) run them once
    (`utils.packing`), where the packed attention can stand in for the model's; same numbers.
    """
    labels = input_ids if labels is None else labels
    parts, why = fused_parts(model) if fused is not False else (None, "")
    if parts is None and why:
        _log_once(why)
    if packed:
        return _packed_logprobs(model, parts, input_ids, attention_mask, labels, start, with_entropy,
                                shared_prefix if shared_prefix > 0 and stands_in(model) else 0)
    targets = labels[:, start + 1:]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    keep = targets != IGNORE_INDEX
    if parts is None:
        out = model(**kwargs)
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, start:-1]
        logp = M.logprobs_from_logits(logits, targets.clamp(min=0)) * keep
        return (logp, M.entropy_from_logits(logits) * keep) if with_entropy else logp
    body, head = parts
    out = body(**kwargs)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, start:-1]
    flat_keep = keep.reshape(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    scored_all = bool(flat_keep.all())
    if not scored_all:  # only the scored rows enter the op (SFT: the labelled tokens)
        rows, flat_targets = rows[flat_keep], flat_targets[flat_keep]
    res = ops.token_logprobs(rows, head.weight, flat_targets, return_entropy=with_entropy)
    outs = res if with_entropy else (res,)
    shaped = []
    for t in outs:
        if not scored_all:
            full = t.new_zeros(flat_keep.shape[0])
            t = full.masked_scatter(flat_keep, t)
        shaped.append(t.view(targets.shape))
    return tuple(shaped) if with_entropy else shaped[0]


def _packed_logprobs(model, parts, input_ids, attention_mask, labels, start: int, with_entropy: bool,
                     shared_prefix: int):
    """shifted_logprobs on the packed row: only the scored tokens (a labelled real token after a
    real token) are read out of the model's output, then put back in the [B, S - 1 - start] layout."""
    rows = PackedRows.of(attention_mask, input_ids, shared_prefix)
    real = attention_mask.bool()
    keep = (labels[:, 1:] != IGNORE_INDEX) & real[:, 1:] & real[:, :-1]
    keep[:, :start] = False
    source = rows.slots()[:, :-1][keep]        # where each scored token's context ends, in the row
    targets = labels[:, 1:][keep]
    kwargs = dict(input_ids=rows.pack(input_ids), position_ids=rows.position_ids, use_cache=False)
    if parts is None:
        with packed_attention(model, rows):
            out = model(**kwargs)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0, source]
        values = [M.logprobs_from_logits(logits, targets)]
        if with_entropy:
            values.append(M.entropy_from_logits(logits))
    else:
        body, head = parts
        with packed_attention(model, rows):
            out = body(**kwargs)
        hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0, source]
        res = ops.token_logprobs(hidden, head.weight, targets, return_entropy=with_entropy)
        values = list(res) if with_entropy else [res]
    shaped = [v.new_zeros(keep.shape).masked_scatter(keep, v)[:, start:] for v in values]
    return tuple(shaped) if with_entropy else shaped[0]

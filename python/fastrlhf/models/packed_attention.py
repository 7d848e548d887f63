"""Attention for a packed row whose cost is that of the sequences, not of the row.

Given HF's padding-free convention alone (restarting `position_ids`, no attention mask),
transformers' sdpa/eager attention masks a packed row of T tokens with a [T, T] mask: correct,
but T^2 work, where the padded batch did sum(L_i^2)-like work. `packed_attention(model, rows)`
switches the model, for one forward, to an attention that re-pads q/k/v into [sequences, heads,
longest, head_dim] (right-padded, so a causal mask alone keeps every real query on real keys),
attends with one causal SDPA call (softcap or a sliding window: the same math spelled out), and
packs the result back. The linear layers, norms and MLPs run on the packed tokens only.

A row with shared prefixes (`PackedRows.of(shared_prefix=P)`: a GRPO group's prompt held once)
is re-padded by gathering: the prefix's keys and values are copied into every sequence that reads
them, so each sequence attends exactly as it would alone, and in the backward their gradients add
up onto the one copy. The prompt's linear layers and MLPs then run once per group, not once per
answer. Only this attention can run such a row (HF's mask would cut the answers off their prompt):
callers share prefixes only where `stands_in(model)`.

Only the attention implementation named in the model's config changes, and only inside the
context; the [T, T] mask HF would build for the packed row is skipped. A model with gradient
checkpointing keeps its own attention (on HF's packed mask: correct, T^2 work): its layers
recompute in the backward, outside the context, and must save what their forward saved. The
trainers probe that path for such models (`rlhf.packing.check_packed_attention(recompute=True)`).
Models whose attention does not go through the transformers attention interface keep their own
attention (and its packed mask).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from ..utils.packing import PackedRows

_state = threading.local()   # .layout: (home [T], src [B * L] or None, sequences B, longest L) or None
_registered = set()
PLAIN = ("sdpa", "eager")     # the implementations this one stands in for
EXTRA_TERMS = ("s_aux", "position_bias")  # attention terms it does not implement: left to the model


def _name(impl: str) -> str:
    return f"fastrlhf_packed_{impl}"


def _repadded(x: torch.Tensor, index: torch.Tensor, n: int, longest: int) -> torch.Tensor:
    """[1, H, T, D] -> [n, H, longest, D], each sequence right-padded with zeros."""
    t = x[0].transpose(0, 1)  # [T, H, D]
    grid = t.new_zeros(n * longest, *t.shape[1:]).index_copy(0, index, t)
    return grid.view(n, longest, *t.shape[1:]).transpose(1, 2)


def _gathered(x: torch.Tensor, src: torch.Tensor, n: int, longest: int) -> torch.Tensor:
    """[1, H, T, D] -> [n, H, longest, D]: cell i holds token src[i] (T: zeros); a shared prefix's
    tokens appear in every sequence that reads them (their gradients add up in the backward)."""
    t = x[0].transpose(0, 1)  # [T, H, D]
    t = torch.cat([t, t.new_zeros(1, *t.shape[1:])])
    return t[src].view(n, longest, *t.shape[1:]).transpose(1, 2)


def _spelled_out(q, k, v, scale: float, softcap: Optional[float], window: Optional[int]) -> torch.Tensor:
    """softmax(softcap(q k^T * scale) + causal/window mask) v, in fp32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    cols = torch.arange(q.shape[-2], device=q.device)
    allowed = cols[None, :] <= cols[:, None]
    if window is not None:
        allowed = allowed & (cols[None, :] > cols[:, None] - window)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.float()).to(q.dtype)


def _attention(impl: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def own(module, query, key, value, attention_mask, **kwargs):
        if impl == "sdpa":
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        from importlib import import_module
        eager = getattr(import_module(type(module).__module__), "eager_attention_forward")
        return eager(module, query, key, value, attention_mask, **kwargs)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layout = getattr(_state, "layout", None)
        if layout is None or query.shape[0] != 1 or not getattr(module, "is_causal", True) or \
                any(kwargs.get(k) is not None for k in EXTRA_TERMS):
            if layout is not None and layout[1] is not None:
                raise RuntimeError(f"a packed row with shared prompts reached {type(module).__name__}, whose "
                                   "attention fastrlhf's packed attention cannot stand in for (not causal, or "
                                   f"with {'/'.join(EXTRA_TERMS)}); train it with --share_prompts false")
            return own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        home, src, n, longest = layout
        if src is None:
            q, k, v = (_repadded(x, home, n, longest) for x in (query, key, value))
        else:
            q, k, v = (_gathered(x, src, n, longest) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:  # GQA / MQA
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
        if softcap is None and (window is None or window >= longest):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                 dropout_p=dropout if module.training else 0.0)
        else:
            out = _spelled_out(q, k, v, scale, softcap, window)
        out = out.transpose(1, 2).reshape(n * longest, q.shape[1], q.shape[-1])[home]
        return out[None], None
    return attention


def _register(impl: str) -> str:
    name = _name(impl)
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        AttentionInterface.register(name, _attention(impl))
        own_mask = ALL_MASK_ATTENTION_FUNCTIONS[impl]

        def mask(*args, **kwargs):
            # this attention reads no mask, so HF's own ([T, T] for a packed row) is not built
            if getattr(_state, "layout", None) is not None:
                return None
            return own_mask(*args, **kwargs)
        AttentionMaskInterface.register(name, mask)
        _registered.add(name)
    return name


def _hf_model(model):
    """The PreTrainedModel inside an engine, PEFT wrapper or RewardModel (None when not one)."""
    from transformers import PreTrainedModel
    m = model
    for _ in range(8):
        if isinstance(m, PreTrainedModel):
            return m
        if callable(getattr(m, "get_base_model", None)):  # PEFT
            m = m.get_base_model()
            continue
        m = getattr(m, "module", None) or getattr(m, "backbone", None)
        if m is None:
            return None
    return None


@contextlib.contextmanager
def own_attention():
    """Within: `packed_attention` stands in for nothing, so a packed forward runs the model's own
    attention on HF's packed mask (what a recomputation in gradient checkpointing's backward runs;
    the trainers probe it)."""
    before = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = before


def stands_in(model) -> bool:
    """Whether `packed_attention` stands in for `model`'s attention in a forward run now (grad mode
    as it is): its sdpa/eager attention goes through the transformers attention interface, it does
    not recompute checkpointed layers, and `own_attention` is not in force. Rows with shared
    prefixes (`PackedRows.of(shared_prefix=...)`) need it."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    # a checkpointed layer recomputes in the backward, outside the context, and must save the
    # same tensors as its forward did: such a model keeps its own attention throughout
    recompute = hf is not None and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    return impl in PLAIN and bool(getattr(hf, "_supports_attention_backend", False)) and not recompute and \
        not getattr(_state, "off", False)


@contextlib.contextmanager
def packed_attention(model, rows: PackedRows):
    """Within: `model` (HF, PEFT, a DeepSpeed engine or a RewardModel) attends per sequence of
    `rows` (see the module docstring); a model whose attention this cannot stand in for is left as
    it is (its own attention on its packed mask), which rows with shared prefixes must not meet."""
    if not stands_in(model):
        if rows.shared:
            raise RuntimeError("packed rows with shared prefixes need fastrlhf's packed attention, which cannot "
                               "stand in for this model (check `stands_in` before sharing)")
        yield
        return
    config = _hf_model(model).config
    impl = config._attn_implementation
    src, home, n, longest = rows.grid()
    config._attn_implementation = _register(impl)
    _state.layout = (home, src if rows.shared else None, n, longest)
    try:
        yield
    finally:
        _state.layout = None
        config._attn_implementation = impl

"""One generic decoder forward over `fastrlhf.ops`, driven by an ArchSpec.

`build_model_weights` reads the generation weights out of an HF model (views; LoRA fused into
buffers; optional QKV / gate-up concatenation). `Decoder.packed` runs the new tokens of several
sequences packed into one row (prompts, appended tokens, beside decoding rows' tokens) and writes
them into the paged KV cache; `Decoder.decode` runs one token per sequence. Ops are resolved once per Decoder, so the per-step
cost is the math plus a thin Python loop.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers.activations import ACT2FN

from fastrlhf import ops

from .arch_spec import ArchSpec
from .attention import softcap_
from .moe import MoEWeights, build_moe_weights, moe_forward
from .weights import Linear, Norm, concat_linears, get_path, require_path, resolve_linear, resolve_norm


@dataclass
class LayerWeights:
    in_norm: Optional[Norm]         # None: the block norms its outputs only (OLMo-2)
    post_norm: Optional[Norm]
    qkv: Optional[Linear]           # fused projection (native, or a concatenated copy)
    q: Optional[Linear]
    k: Optional[Linear]
    v: Optional[Linear]
    o: Linear
    up: Optional[Linear]
    gate: Optional[Linear]
    gate_up: Optional[Linear]       # [gate | up]: native (Phi-3), or a concatenated copy when fuse_projections
    down: Optional[Linear]          # None in a mixture-of-experts layer
    q_norm: Optional[Norm] = None   # per-head norms over head_dim (Qwen3)
    k_norm: Optional[Norm] = None
    attn_out_norm: Optional[Norm] = None  # sandwich norms on the block outputs (Gemma2)
    mlp_out_norm: Optional[Norm] = None
    moe: Optional[MoEWeights] = None  # the layer's MLP is a mixture of experts (moe.py)


@dataclass
class ModelWeights:
    embed: torch.Tensor
    pos_embed: Optional[torch.Tensor]
    final_norm: Optional[Norm]
    lm_head: Linear
    project_in: Optional[Linear] = None   # OPT-350m: embed dim -> hidden size
    project_out: Optional[Linear] = None  # and back, before the lm_head
    embed_scale: Optional[torch.Tensor] = None  # 0-d, in the embedding dtype (Gemma: sqrt(hidden))
    embed_norm: Optional[Norm] = None  # after the embedding (Bloom)
    layers: List[LayerWeights] = field(default_factory=list)
    # ZeRO-3 layer-by-layer mode: a function yielding each layer's weights inside its gather
    layer_iter: Optional[Callable[[], Iterator[LayerWeights]]] = None
    # tensor parallelism with a vocabulary-parallel embedding: the token ids [start, stop) whose
    # rows `embed` (and the lm_head) hold on this rank
    vocab_range: Optional[Tuple[int, int]] = None

    def iter_layers(self) -> Iterator[LayerWeights]:
        return self.layer_iter() if self.layer_iter is not None else iter(self.layers)


def build_layer_weights(layer: nn.Module, spec: ArchSpec, *, fuse_projections: bool,
                        backend: Optional[str]) -> LayerWeights:
    lin = lambda p: resolve_linear(require_path(layer, p, "linear"), backend=backend)  # noqa: E731
    post = get_path(layer, spec.post_norm) if spec.post_norm else None
    off = spec.norm_offset
    q = k = v = qkv = None
    if spec.qkv is not None:
        qkv = lin(spec.qkv)
    else:
        q, k, v = lin(spec.q), lin(spec.k), lin(spec.v)
        if fuse_projections:  # one matmul instead of three, at the cost of a weight copy
            qkv, q, k, v = concat_linears([q, k, v]), None, None, None
    gate = up = gate_up = down = moe = None
    if spec.moe is not None and get_path(layer, spec.moe.experts) is not None:
        moe = build_moe_weights(layer, spec.moe, lambda m: resolve_linear(m, backend=backend))
    elif spec.gate_up is not None:
        gate_up = lin(spec.gate_up)
    else:
        gate = lin(spec.gate) if spec.gate else None
        up = lin(spec.up)
        if gate is not None and fuse_projections:
            gate_up, gate, up = concat_linears([gate, up]), None, None
    if moe is None:
        down = lin(spec.down)
    norm = lambda p: None if p is None else resolve_norm(require_path(layer, p, "norm"), off)  # noqa: E731
    return LayerWeights(
        in_norm=norm(spec.input_norm),
        post_norm=None if post is None else resolve_norm(post, off),
        qkv=qkv, q=q, k=k, v=v, o=lin(spec.o), up=up, gate=gate, gate_up=gate_up,
        down=down, q_norm=norm(spec.q_norm), k_norm=norm(spec.k_norm),
        attn_out_norm=norm(spec.attn_out_norm), mlp_out_norm=norm(spec.mlp_out_norm), moe=moe)


def lm_head_module(model: nn.Module, spec: ArchSpec) -> nn.Module:
    head = get_path(model, spec.lm_head)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()  # e.g. GPT-NeoX's `embed_out` before transformers 5
    if head is None:
        head = require_path(model, spec.lm_head, "lm_head")  # raises the clear error
    return head


def build_model_weights(model: nn.Module, spec: ArchSpec, *, fuse_projections: bool,
                        backend: Optional[str], per_layer: bool = True) -> ModelWeights:
    backbone = require_path(model, spec.backbone, "decoder stack")
    embed = require_path(backbone, spec.embed, "token embedding").weight.data
    pos = get_path(backbone, spec.pos_embed)
    fnorm = get_path(backbone, spec.final_norm) if spec.final_norm else None
    enorm = None if spec.embed_norm is None else resolve_norm(require_path(backbone, spec.embed_norm, "norm"))
    head = lm_head_module(model, spec)
    proj = lambda p: None if p is None else resolve_linear(  # noqa: E731
        require_path(backbone, p, "projection"), backend=backend)
    layers = []
    if per_layer:
        layers = [build_layer_weights(l, spec, fuse_projections=fuse_projections, backend=backend)
                  for l in require_path(backbone, spec.layers, "layer list")]
    return ModelWeights(
        embed=embed, pos_embed=None if pos is None else pos.weight.data,
        final_norm=None if fnorm is None else resolve_norm(fnorm, spec.norm_offset),
        lm_head=resolve_linear(head, backend=backend), project_in=proj(spec.project_in),
        project_out=proj(spec.project_out), layers=layers, embed_norm=enorm,
        # HF casts the normaliser to the embedding dtype before multiplying (bf16 sqrt(3072) = 55.5)
        embed_scale=None if spec.embed_scale is None else torch.tensor(
            spec.embed_scale, dtype=embed.dtype, device=embed.device))


_BIG_HEAD = 1 << 20  # lm_head weight elements from which W @ h^T pays on the CPU (see _logits and
# benchmarks/results/engine_notes.md)


class Decoder:
    """The generic forward. Shapes: hidden [B, S, E]; q/k/v token-major [B, S, H, D]. Every pass
    runs the same per-layer code; only how it rotates, writes the cache and attends differs
    (an attention object from attention.py)."""

    def __init__(self, spec: ArchSpec, device: torch.device, backend: Optional[str] = None,
                 cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                 lean: bool = True, tp=None, rotary_tables: Optional[Dict[str, Tuple]] = None):
        self.spec = spec
        self.tp = tp  # tensor_parallel.TPGroup (spec then holds this rank's head counts), or None
        self.cos, self.sin = cos, sin
        # what differs between layers, read by the attention classes through rotary_of(i) and
        # window_of(i, n): the rotary tables by key (spec.layer_rotary; "" = the only one) and the
        # per-layer sliding windows. ALiBi slopes (every layer alike) are bound into the ops below.
        self.rotary_tables = dict(rotary_tables or {})
        if cos is not None:
            self.rotary_tables.setdefault("", (cos, sin))
        self.layer_windows = spec.layer_windows
        self.alibi_slopes = None if spec.alibi_slopes is None else torch.tensor(
            spec.alibi_slopes, dtype=torch.float32, device=device)
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.grouped_qkv = spec.qkv is not None and spec.qkv_layout == "grouped"
        r = lambda op: ops.resolve(op, device, backend)[1]  # noqa: E731
        self.ops_paged_prefill = r("paged_attention_prefill")
        self.ops_paged_decode = r("paged_attention_decode")
        self.ops_paged_append = r("paged_kv_append")
        self.ops_rotary = r("rotary")
        self.attn_softcap = spec.attn_logit_softcap
        bound = {k: v for k, v in (("softcap", self.attn_softcap), ("alibi_slopes", self.alibi_slopes))
                 if v is not None}
        if bound:  # bound once; other families call the ops unchanged
            self.ops_paged_prefill = functools.partial(self.ops_paged_prefill, **bound)
            self.ops_paged_decode = functools.partial(self.ops_paged_decode, **bound)
        # CPU steps are dominated by per-op dispatch, not math: when every paged op resolves to
        # the torch reference, passes attend with attention.LeanPaged*Attention (the same math
        # in fewer, larger torch ops). Kernel backends always go through ops.
        self.lean = lean and all(ops.resolve(op, device, backend)[0] == "torch" for op in (
            "paged_attention_decode", "paged_attention_prefill", "paged_kv_append", "rotary"))
        self._norm_fn = r("rms_norm") if spec.norm == "rms" else r("layer_norm")
        self._act = ACT2FN[spec.act]
        self.ops_moe = r("fused_moe") if spec.moe is not None else None
        self.qk_norm = spec.q_norm is not None
        if self.qk_norm != (spec.k_norm is not None):
            raise ValueError("ArchSpec: q_norm and k_norm go together")
        if self.qk_norm and not spec.qk_norm_per_head and self.grouped_qkv:
            raise ValueError("ArchSpec: q/k norms over all heads need the split or separate q/k/v layout")
        if (spec.attn_out_norm is None) != (spec.mlp_out_norm is None):
            raise ValueError("ArchSpec: attn_out_norm and mlp_out_norm go together")
        if spec.input_norm is None and spec.attn_out_norm is None:
            raise ValueError("ArchSpec: a block without input norms needs the output norms (attn_out_norm)")
        if spec.attn_out_norm is not None:  # resolved once: the plain block gains no work
            if not spec.pre_norm or spec.parallel_residual:
                raise ValueError("ArchSpec: sandwich norms need a sequential pre-norm block")
            self._layer = self._sandwich_layer
        self.softcap = spec.final_logit_softcap
        self.scale = spec.head_dim ** -0.5 if spec.attn_scale is None else spec.attn_scale
        self.residual_multiplier = spec.residual_multiplier

    def rotary_of(self, i: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of layer i's rotary table, or None for a layer without rotary."""
        if not self.spec.rotary_dim:
            return None
        key = self.spec.layer_rotary[i] if self.spec.layer_rotary else ""
        return None if key is None else self.rotary_tables[key]

    def window_of(self, i: int, n_cols: int) -> Optional[int]:
        """Layer i's sliding window for a pass whose keys sit at positions below n_cols (what its
        block tables can hold); None when the layer has none or it hides no key (window >= n_cols:
        full attention, and the ops are called exactly as for a model without windows)."""
        w = self.layer_windows[i] if self.layer_windows else None
        return w if w is not None and w < n_cols else None

    # -- building blocks -------------------------------------------------------------------
    def _norm(self, x, n: Norm, residual=None):
        if self.spec.norm == "rms":
            return self._norm_fn(x, n.weight, self.spec.eps, residual)
        return self._norm_fn(x, n.weight, n.bias, self.spec.eps, residual)

    def _qkv(self, lw: LayerWeights, h: torch.Tensor):
        """(q, k, v, qk): views into the projection output, token-major: q [B, S, Hq, D] (the
        grouped layout: [B, S, Hkv, group, D]), k/v [B, S, Hkv, D], and qk one view over the q
        and k heads when a fused projection lays them out together (else None), so that a path
        may rotate both at once. q/k norms (Qwen3) make new tensors and drop qk."""
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qk = None
        if lw.qkv is None:
            q, k, v = lw.q(h), lw.k(h), lw.v(h)
            b, s = q.shape[:2]
            q, k, v = q.reshape(b, s, hq, d), k.reshape(b, s, hkv, d), v.reshape(b, s, hkv, d)
        else:
            out = lw.qkv(h)
            b, s = out.shape[:2]
            if self.grouped_qkv:  # [Hkv, group + 2, D] per token: NeoX, Falcon
                g = hq // hkv
                out = out.view(b, s, hkv, g + 2, d)
                q, k, v, qk = out[:, :, :, :g], out[:, :, :, g], out[:, :, :, g + 1], out[:, :, :, :g + 1]
            else:  # [q heads | k heads | v heads]
                out = out.view(b, s, hq + 2 * hkv, d)
                q, k, v = out.split([hq, hkv, hkv], dim=2)
                qk = out[:, :, :hq + hkv]
        if self.qk_norm and self.spec.qk_norm_per_head:  # per-head norm over head_dim
            q, k, qk = self._norm(q, lw.q_norm), self._norm(k, lw.k_norm), None
        elif self.qk_norm:  # one norm over all heads' features (OLMoE, OLMo-2)
            q = self._norm(q.reshape(b, s, -1), lw.q_norm).view(b, s, hq, d)
            k = self._norm(k.reshape(b, s, -1), lw.k_norm).view(b, s, hkv, d)
            qk = None
        if self.spec.clip_qkv is not None:
            c = self.spec.clip_qkv
            q, k, v, qk = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c), None
        return q, k, v, qk

    def _mlp(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        if lw.moe is not None:
            return moe_forward(self.spec.moe, lw.moe, h, self._act, self.ops_moe)
        if lw.gate_up is not None:
            g, u = lw.gate_up(h).chunk(2, dim=-1)
            out = lw.down(self._act(g) * u)
        elif lw.gate is not None:
            out = lw.down(self._act(lw.gate(h)) * lw.up(h))
        else:
            out = lw.down(self._act(lw.up(h)))
        return out if self.residual_multiplier == 1.0 else out.mul_(self.residual_multiplier)

    def _attention(self, i: int, lw: LayerWeights, h, attn):
        """Layer i's projected attention output for hidden h; `attn` is the pass's attention."""
        q, k, v, qk = self._qkv(lw, h)
        if self.rotary_of(i) is not None:
            q, k = attn.rotate(i, q, k, qk)
        out = lw.o(attn.attend(i, q, k, v))
        return out if self.residual_multiplier == 1.0 else out.mul_(self.residual_multiplier)

    def _layer(self, i: int, lw: LayerWeights, x, attn):
        sp = self.spec
        if not sp.pre_norm:  # post-norm blocks (OPT-350m)
            x = self._norm(x + self._attention(i, lw, x, attn), lw.in_norm)
            return self._norm(x + self._mlp(lw, x), lw.post_norm)
        h = self._norm(x, lw.in_norm)
        a = self._attention(i, lw, h, attn)
        if sp.parallel_residual:
            h2 = h if lw.post_norm is None else self._norm(x, lw.post_norm)
            return (self._mlp(lw, h2) + a) + x
        h2, x = self._norm(a, lw.post_norm, residual=x)
        return x + self._mlp(lw, h2)

    def _sandwich_layer(self, i: int, lw: LayerWeights, x, attn):
        """Gemma2: x + norm(attn(norm(x))), then + norm(mlp(norm(x))); OLMo-2, without input norms:
        x + norm(attn(x)), then + norm(mlp(x))."""
        h = x if lw.in_norm is None else self._norm(x, lw.in_norm)
        a = self._norm(self._attention(i, lw, h, attn), lw.attn_out_norm)
        if lw.post_norm is None:
            x = h2 = x + a
        else:
            h2, x = self._norm(a, lw.post_norm, residual=x)
        return x + self._norm(self._mlp(lw, h2), lw.mlp_out_norm)

    def _embed(self, w: ModelWeights, ids, positions):
        if w.vocab_range is not None:  # vocabulary-parallel: this rank's rows, zeros elsewhere, summed
            lo, hi = w.vocab_range
            local = ids - lo
            inside = (local >= 0) & (local < hi - lo)
            x = nn.functional.embedding(local.clamp(0, hi - lo - 1), w.embed)
            x = self.tp.all_reduce_(x.mul_(inside[..., None].to(x.dtype)))
        else:
            x = nn.functional.embedding(ids, w.embed)
        if w.embed_scale is not None:
            x = x * w.embed_scale
        if w.embed_norm is not None:
            x = self._norm(x, w.embed_norm)
        if w.project_in is not None:
            x = w.project_in(x)
        if w.pos_embed is not None:
            x = x + nn.functional.embedding(positions + self.spec.pos_offset, w.pos_embed)
        return x

    def _logits(self, lm: Linear, h: torch.Tensor) -> torch.Tensor:
        """The lm_head product. On the lean (CPU) path, for hidden states [B, E] and a large head,
        as W @ h^T: the lm_head is a small model's largest matmul (V x E read once per step for
        only B rows), and with so few rows MKL runs it faster with the weight as the row operand
        (same weight view, no copy). The logits come back as a transposed view [B, V]; argmax /
        softmax over dim -1 read it in place. Small heads keep the plain form, faster there."""
        if not self.lean or h.dim() != 2 or lm.transposed or lm.weight.numel() < _BIG_HEAD:
            return lm(h)
        logits = torch.mm(lm.weight, h.t()).t()
        return logits if lm.bias is None else logits + lm.bias

    def _head(self, w: ModelWeights, x):
        """Logits of hidden states x [B, ..., E]. Under tensor parallelism, of this rank's own rows
        of the group's batch only: a replicated lm_head runs on those rows; a vocabulary-parallel
        one runs its slice on every row, and an all-to-all hands each rank its rows' slices."""
        if self.tp is not None and w.vocab_range is None:
            x = x[self.tp.own]
        if w.final_norm is not None:
            x = self._norm(x, w.final_norm)
        if w.project_out is not None:
            x = w.project_out(x)
        logits = self._logits(w.lm_head, x)
        if self.spec.logit_divisor is not None:
            logits = logits / self.spec.logit_divisor
        if self.softcap is not None:
            logits = softcap_(logits, self.softcap)
        if self.tp is not None and w.vocab_range is not None:
            logits = self.tp.exchange_rows(logits)
        return logits

    def _run_layers(self, w: ModelWeights, x, attn):
        for i, lw in enumerate(w.iter_layers()):
            x = self._layer(i, lw, x, attn)
        return x

    # -- passes ----------------------------------------------------------------------------
    def packed(self, w: ModelWeights, ids: torch.Tensor, positions: torch.Tensor, attn,
               last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The new tokens of several sequences packed into one row: ids/positions [T] int64,
        `attn` a PagedPackedAttention. Returns the logits at the token indices `last` [B] (each
        sequence's last new token), or at every token [T, V] when `last` is None."""
        x = self._run_layers(w, self._embed(w, ids[None], positions[None]), attn)
        return self._head(w, x[0] if last is None else x[0, last])

    def decode(self, w: ModelWeights, tokens: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """One token per sequence: tokens/positions [B] int64, `attn` a (Lean)PagedDecodeAttention.
        Returns logits [B, V]."""
        x = self._run_layers(w, self._embed(w, tokens[:, None], positions[:, None]), attn)
        return self._head(w, x[:, 0])

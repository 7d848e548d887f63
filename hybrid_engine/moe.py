"""The mixture-of-experts MLP of the generic decoder, driven by an `arch_spec.MoESpec`.

    logits = x · routerᵀ (model dtype) -> softmax in fp32 -> top-k (-> renormalised)
    y = ops.fused_moe(x, ids, weights, gate_up [E, 2I, H], down [E, H, I])
      (+ sigmoid(shared_gate(x)) * shared_expert(x), the shared expert of Qwen2-MoE)

Weights are views of the training parameters (transformers 5 keeps each layer's experts as two
fused 3-D parameters). PEFT LoRA on them (`LoraConfig(target_parameters=[...experts.gate_up_proj,
...experts.down_proj])`, PEFT's `ParamWrapper`) and on the router weight is fused into new
buffers, as for linears: the training parameters are never written. Under tensor parallelism each
rank holds every expert's slice of the intermediate dimension (gate/up rows, down columns), so the
block's output is a partial sum; the shared expert is sharded the same way and one all-reduce sums
both (`reduce`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .arch_spec import MoESpec
from .weights import Linear, require_path

# (A [r * E, in] or [r, in], B [out, r * E] or [out, r], scaling, experts): PEFT LoRA factors of
# one parameter (PEFT's ParamWrapper layout for 3-D expert parameters)
LoraFactors = Tuple[torch.Tensor, torch.Tensor, float, int]


@dataclass
class SharedExpert:
    gate: Linear
    up: Linear
    down: Linear
    scale_gate: Optional[Linear]  # [1, H]: output times sigmoid(scale_gate(x))


@dataclass
class MoEWeights:
    router: torch.Tensor           # [E, H]
    gate_up: torch.Tensor          # [E, 2I, H] (I: this rank's share under tensor parallelism)
    down: torch.Tensor             # [E, H, I]
    shared: Optional[SharedExpert] = None
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # TP: sums partial outputs in place


# ---------------------------------------------------------------------------------- reading parameters

def _is_param_wrapper(m: nn.Module) -> bool:
    return type(m).__name__ == "ParamWrapper" and hasattr(m, "parameter_name") and hasattr(m, "base_layer")


def param_parts(module: nn.Module, name: str) -> Tuple[torch.Tensor, List[LoraFactors]]:
    """The parameter `name` of a module, and the active PEFT LoRA factors targeting it (PEFT wraps
    a module once per targeted parameter, nesting the wrappers)."""
    lora: List[LoraFactors] = []
    m = module
    while _is_param_wrapper(m):
        if m.parameter_name == name and not m.merged and not getattr(m, "disable_adapters", False):
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    lora.append((m.lora_A[adapter].weight, m.lora_B[adapter].weight,
                                 float(m.scaling[adapter]), int(m.num_experts)))
        m = m.base_layer
    p = getattr(m, name, None)
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"the engine expected a parameter {name!r} on {type(m).__name__}; the model's MoE "
                         "layout does not match the engine spec (use EngineConfig(fallback='hf'))")
    return p, lora


def lora_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lhs [E, out, r], rhs [E, r, in]) in fp32 with delta[e] = lhs[e] @ rhs[e] (times scaling),
    for a parameter stored [E, out, in] (transformers' non-transposed experts) or [out, in].
    PEFT's layout: A's rows are (expert, rank) with the rank fastest, B's columns (rank, expert)
    with the expert fastest."""
    rhs = a.float().reshape(experts, -1, a.shape[-1])
    lhs = b.float().reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return lhs, rhs


def fuse_param_lora(w: torch.Tensor, lora, select: Optional[Callable] = None) -> torch.Tensor:
    """w + Σ scaling · lhs @ rhs into a NEW buffer of w's dtype (fp32 sum, one rounding). `select`
    (tensor parallelism) cuts the factors to the slice w holds: select(lhs, rhs) -> (lhs, rhs)."""
    acc = w.float()
    for a, b, s, experts in lora:
        lhs, rhs = lora_factors(a, b, experts)
        if select is not None:
            lhs, rhs = select(lhs, rhs)
        delta = torch.bmm(lhs, rhs) * s
        acc = acc + (delta if w.dim() == 3 else delta[0])
    return acc.to(w.dtype)


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    p, lora = param_parts(module, name)
    return p.data if not lora else fuse_param_lora(p.data, [(a.data, b.data, s, e) for a, b, s, e in lora])


def _check_experts(spec: MoESpec, router, gate_up, down) -> None:
    e, i, h = spec.n_experts, spec.intermediate, router.shape[1]
    want = {"router weight": ((e, h), tuple(router.shape)), "gate_up_proj": ((e, 2 * i, h), tuple(gate_up.shape)),
            "down_proj": ((e, h, i), tuple(down.shape))}
    for what, (expected, got) in want.items():
        if expected != got:
            raise ValueError(f"the experts' {what} is {got}, the engine spec expects {expected} (transformers "
                             "5's fused [E, 2I, H] / [E, H, I] layout); use EngineConfig(fallback='hf')")


def build_moe_weights(layer: nn.Module, spec: MoESpec, resolve_linear: Callable) -> MoEWeights:
    """Views of one layer's router and experts (LoRA fused into new buffers)."""
    router = _weight(require_path(layer, spec.router, "MoE router"), "weight")
    experts = require_path(layer, spec.experts, "MoE experts")
    gate_up, down = _weight(experts, "gate_up_proj"), _weight(experts, "down_proj")
    _check_experts(spec, router, gate_up, down)
    shared = None
    if spec.shared_expert is not None:
        lin = lambda name: resolve_linear(require_path(layer, f"{spec.shared_expert}.{name}", "linear"))  # noqa: E731
        shared = SharedExpert(lin("gate_proj"), lin("up_proj"), lin("down_proj"),
                              None if spec.shared_expert_gate is None else
                              resolve_linear(require_path(layer, spec.shared_expert_gate, "linear")))
    return MoEWeights(router, gate_up, down, shared)


# ---------------------------------------------------------------------------------- the forward

def route(spec: MoESpec, router: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [N, k], topk_weights [N, k]) of tokens x [N, H], as the HF routers compute them:
    logits in the model dtype, softmax in fp32, top-k, optional renormalisation (fp32), and the
    weights rounded to the model dtype where the family does."""
    logits = nn.functional.linear(x, router)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_model_dtype:
        weights = weights.to(logits.dtype)
    return ids, weights


def moe_forward(spec: MoESpec, mw: MoEWeights, h: torch.Tensor, act: Callable,
                fused_moe: Callable) -> torch.Tensor:
    """The MoE MLP of hidden states h [..., H]."""
    x = h.reshape(-1, h.shape[-1])
    ids, weights = route(spec, mw.router, x)
    y = fused_moe(x, ids, weights, mw.gate_up, mw.down, activation="silu")
    if mw.shared is not None:
        sh = mw.shared
        s = sh.down(act(sh.gate(x)) * sh.up(x))
        if sh.scale_gate is not None:
            s = torch.sigmoid(sh.scale_gate(x)) * s
        y = y + s
    if mw.reduce is not None:
        mw.reduce(y)
    return y.view(h.shape)

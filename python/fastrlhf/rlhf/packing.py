"""Training without padding (`--packing`, `--max_tokens_per_micro_batch`): which sequences of a
micro-batch go into which packed row, and the checks that make packing safe.

A micro-batch (SFT items, preference pairs, or a mini-batch of step-3 answers) is run as one or
more *passes*, each a packed row (`utils.packing.PackedRows`) of at most the token budget; a
preference pair stays in one pass (its loss couples the two sequences). Every rank runs the same
number of passes (ZeRO-3 forwards and ZeRO-2 reductions are collective), so a rank that needs
fewer splits its passes further. Each pass's loss is its share of the micro-batch's loss (the
denominators are the whole micro-batch's), so the passes' gradients add up to the padded
micro-batch's and the losses, per-sequence reductions and optimizer steps are those of the
padded run.

Attention: the packed row goes through the model with HF's padding-free convention (restarting
`position_ids`, no attention mask, no cache), and `models.packed_attention` stands in for its
sdpa/eager attention for that forward, attending per sequence at the cost of the sequences (not
of the row). Where it cannot stand in, the model's own attention runs on the packed mask
transformers builds from the positions (5.24 checked). `check_packed_attention` probes every model
before training and refuses a family that would let one sequence see another: e.g. Bloom (no
position_ids), or OPT with gradient checkpointing (a checkpointed model keeps its own attention,
and OPT's mask ignores position_ids in transformers 5.x).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import ConfigError
from ..utils.distributed import all_reduce_max

PROBE_LENGTHS = (5, 3)  # the probe's two packed sequences


def check_budget(budget: Optional[int], longest: int, what: str) -> None:
    """A token budget must hold the longest packing unit (a sequence, or a pair of them)."""
    if budget is not None and longest > budget:
        raise ConfigError(f"--max_tokens_per_micro_batch {budget} is smaller than {what} ({longest} tokens): "
                          f"a sequence is never split across passes; raise it to at least {longest}")


def plan_passes(lengths: Sequence[int], budget: Optional[int], pairs: bool = False) -> List[List[int]]:
    """Rows of a micro-batch grouped into passes of at most `budget` real tokens (None: one pass),
    first-fit by decreasing length. With `pairs`, rows i and i + B/2 (a chosen answer and its
    rejected twin) are one unit and a pass lists its chosen rows, then their twins. The number of
    passes is agreed over the ranks (`agree`)."""
    n = len(lengths)
    units = [[i, i + n // 2] for i in range(n // 2)] if pairs else [[i] for i in range(n)]
    size = [sum(int(lengths[r]) for r in u) for u in units]
    if budget is None:
        groups = [list(range(len(units)))]
    else:
        check_budget(budget, max(size, default=0), "the longest pair (chosen + rejected)" if pairs
                     else "the longest sequence")
        groups, room = [], []
        for u in sorted(range(len(units)), key=lambda k: (-size[k], k)):
            slot = next((g for g in range(len(groups)) if room[g] >= size[u]), None)
            if slot is None:
                groups.append([])
                room.append(budget)
                slot = len(groups) - 1
            groups[slot].append(u)
            room[slot] -= size[u]
    groups = agree(groups)
    return [sorted(units[u][0] for u in g) + sorted(units[u][1] for u in g if pairs) for g in groups]


def agree(groups: List[List[int]]) -> List[List[int]]:
    """The same number of passes on every rank: the largest passes are halved until this rank has
    as many as the rank that needs the most (every rank holds as many units, so it always can)."""
    target = int(all_reduce_max(torch.tensor([float(len(groups))]))[0])
    groups = [sorted(g) for g in groups]
    while len(groups) < target:
        biggest = max(range(len(groups)), key=lambda g: len(groups[g]))
        g = groups.pop(biggest)
        if len(g) < 2:
            raise RuntimeError("cannot split a one-unit pass further; ranks hold different micro-batch sizes")
        groups[biggest:biggest] = [g[0::2], g[1::2]]
    return groups


def check_packed_attention(model, role: str, device: torch.device, precision: str = "fp32",
                           recompute: bool = False, share: bool = False) -> None:
    """Refuse `--packing` for a model that would let one packed sequence see another, or whose
    positions do not restart. Two sequences are run padded and packed, and packed with the first
    one's tokens changed: a never-crossing attention leaves the second one's outputs (log-probs of
    a causal LM, or a reward model's / critic's values) untouched. With `recompute` (gradient
    checkpointing) the model's own attention on HF's packed mask is probed too: a checkpointed
    model trains through it. With `share` (--share_prompts), rows that share a prefix and run it
    once must compute what they compute padded. Collective under ZeRO-3 (every rank runs the probe)."""
    from ..models.packed_attention import own_attention
    from ..hybrid_engine.engine import unwrap_model
    hf = unwrap_model(model)
    family = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
    paths = [("", contextlib.nullcontext)] + [(" (with --gradient_checkpointing, its own attention)", own_attention)] * recompute
    for what, context in paths:
        with context():
            why = _probe(model, hf, device, precision == "fp32")
        if why:
            import transformers
            raise ConfigError(f"--packing: the {role} ({family}) cannot run packed sequences with transformers "
                              f"{transformers.__version__}{what}: {why}. Drop --packing for this model family"
                              + (" or --gradient_checkpointing" if what else ""))
    if share:
        why = _probe_shared(model, hf, device, precision == "fp32")
        if why:
            raise ConfigError(f"--share_prompts: the {role} ({family}) cannot run a prompt once for several answers: "
                              f"{why}. Add --share_prompts false (packing stays on)")


def _probe(model, hf, device: torch.device, full: bool) -> str:
    """Why `model` cannot run packed sequences ('' when it can)."""
    from ..utils.positions import position_ids_from_mask
    from .logprobs import shifted_logprobs
    vocab = int(getattr(getattr(hf, "config", None), "vocab_size", 0) or 2)
    a, b = PROBE_LENGTHS
    ids = torch.zeros(2, a, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    ids[0], ids[1, :b] = (torch.arange(a) * 7 + 5) % vocab, (torch.arange(b) * 13 + 2) % vocab
    mask[0], mask[1, :b] = 1, 1
    changed = ids.clone()
    changed[0] = (torch.arange(a) * 11 + 3) % vocab
    values = hasattr(hf, "v_head")  # a RewardModel (reward model or critic): per-token values

    def run(x, packed):
        if values:
            return model(x, mask, packed=packed)
        return shifted_logprobs(model, x, mask, position_ids=position_ids_from_mask(mask), packed=packed)
    try:
        with torch.no_grad():
            padded, packed, packed_changed = (run(x, p).float() for x, p in
                                              ((ids, False), (ids, True), (changed, True)))
    except TypeError as e:  # e.g. a forward without position_ids
        return f"its packed forward failed ({e})"
    real = (mask[1] if values else mask[1, 1:] * mask[1, :-1]).bool()
    crossing = (packed[1, real] - packed_changed[1, real]).abs().max().item()
    drift = (packed[1, real] - padded[1, real]).abs().max().item()
    if crossing > (1e-5 if full else 1e-2):
        return (f"its attention reaches across packed sequences (a sequence's outputs moved by {crossing:.3g} "
                "when another sequence of the row changed)")
    if drift > (1e-3 if full else 0.25):
        return (f"a packed sequence does not compute what it computes padded (off by {drift:.3g}; are its "
                "positions taken from position_ids?)")
    return ""


def _probe_shared(model, hf, device: torch.device, full: bool) -> str:
    """Why `model` cannot run rows that share a prefix once ('' when it can, or when it would not
    share: the packed attention does not stand in for its own)."""
    from ..models.packed_attention import stands_in
    from ..utils.positions import position_ids_from_mask
    from .logprobs import shifted_logprobs
    if not stands_in(model):
        return ""
    vocab = int(getattr(getattr(hf, "config", None), "vocab_size", 0) or 2)
    # rows 0 and 2 share a left-padded 3-column prefix; row 1's differs; answers of 3, 1 and 2 tokens
    ids = (torch.arange(18, device=device).view(3, 6) * 7 + 3) % vocab
    ids[2, :3] = ids[0, :3]
    mask = torch.ones_like(ids)
    mask[0, 0] = mask[2, 0] = 0
    mask[1, 4:] = 0
    mask[2, 5] = 0
    values = hasattr(hf, "v_head")

    def run(shared_prefix):
        if values:
            return model(ids, mask, packed=shared_prefix >= 0, shared_prefix=max(shared_prefix, 0))
        return shifted_logprobs(model, ids, mask, position_ids=position_ids_from_mask(mask), start=2,
                                packed=shared_prefix >= 0, shared_prefix=max(shared_prefix, 0))
    try:
        with torch.no_grad():
            padded, shared = run(-1).float(), run(3).float()
    except (RuntimeError, TypeError) as e:
        return f"its shared-prompt forward failed ({e})"
    real = (mask if values else mask[:, 3:] * mask[:, 2:-1]).bool()
    drift = (shared[real] - padded[real]).abs().max().item()
    if drift > (1e-3 if full else 0.25):
        return (f"an answer that reads its prompt from another row does not compute what it computes padded (off "
                f"by {drift:.3g})")
    return ""


def check_models(models: Dict[str, Any], ctx, recompute: bool = False, share: bool = False) -> None:
    """`check_packed_attention` on each {role: model} (skipping None), in the run's precision;
    `recompute`: the trained models checkpoint their activations (their own attention is probed too);
    `share`: step 3 runs each group's prompt once (--share_prompts)."""
    from .run_setup import training_dtype
    for role, model in models.items():
        if model is not None:
            check_packed_attention(model, role, ctx.device, training_dtype(ctx), recompute, share)


def longest_item(dataset, pairs: bool) -> int:
    """The longest packing unit of a step-1 or step-2 dataset: a sequence, or a preference pair
    (chosen + rejected)."""
    items = getattr(dataset, "items", None) or [dataset[i] for i in range(len(dataset))]
    if pairs:
        return max((len(it["chosen_input_ids"]) + len(it["rejected_input_ids"]) for it in items), default=0)
    return max((len(it["input_ids"]) for it in items), default=0)


def select_rows(batch: Dict[str, Any], rows: Sequence[int]) -> Dict[str, Any]:
    """The rows of a collated batch (its tensors indexed; lists indexed; the rest shared)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() > 0:
            out[k] = v[torch.as_tensor(list(rows), device=v.device)]
        elif isinstance(v, list):
            out[k] = [v[i] for i in rows]
        else:
            out[k] = v
    return out

"""Tensor-parallel generation: groups of `tp_size` consecutive ranks run one decoder on Megatron-style
shards, while training stays ZeRO data parallel over all ranks.

Inside a group (rank r of N):
- q/k/v and gate/up are column-parallel: rank r keeps the output rows of its attention heads
  (H/N query heads and their KV heads) and of its share of the MLP's intermediate features;
- o and down are row-parallel: rank r keeps the matching input columns, and the partial products
  are summed by an all-reduce over the group before the bias is added;
- the KV cache holds only the rank's KV heads. With fewer KV heads than N (GQA/MQA), each KV head
  is replicated on N / Hkv ranks (the ranks whose query heads use it);
- the token embedding and the lm_head are vocabulary-parallel by default
  (`EngineConfig.tp_lm_head`, chosen by measurement: benchmarks/results/tp_notes.md): rank r
  keeps rows [V r / N, V (r + 1) / N); the embedding looks up its rows (zeros elsewhere) and
  all-reduces; the lm_head computes its vocabulary slice for every row, and one all-to-all gives
  each rank the full-vocabulary logits of ITS OWN prompts only, so no rank ever holds the logits
  of the whole group's batch;
- norms, learned positions and OPT's projections are replicated (small).

Prompts: every rank of a group runs the union of the group's prompts; each rank samples only its
own rows, with its own generator, from its own rows' logits, and the chosen tokens are
all-gathered, so a rank's results are those it would get alone (tp_size=1) up to the rounding of
the split reductions.

Weights are read through a `ShardReader`: views (one range) or one-time slices (several ranges)
of full parameters (no ZeRO, ZeRO 0-2); for ZeRO-3 partitions, one all-to-all per parameter
moves each rank exactly the elements of its slice (DeepSpeed partitions the flattened parameter
into contiguous chunks, so every rank can compute who needs what), never a whole parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .arch_spec import ArchSpec, MoESpec, spec_for
from .moe import MoEWeights, SharedExpert, fuse_param_lora, param_parts
from .weights import Linear, Norm, _fuse_all, concat_linears, get_path, linear_parts, require_path

Ranges = Tuple[Tuple[int, int], ...]   # sorted, disjoint [start, stop) index ranges along one dim
Selection = Tuple[Ranges, ...]          # the ranges of every tp rank (index = tp rank)

LM_HEAD_MODES = ("vocab_parallel", "replicated")


# ---------------------------------------------------------------------------------- checks

def valid_tp_sizes(n_heads: int, n_kv_heads: int, world_size: Optional[int] = None,
                   divides: Sequence[int] = ()) -> List[int]:
    """The tp sizes a model with these head counts supports (dividing world_size when given, and
    every width in `divides`: the experts' intermediate widths of a mixture of experts)."""
    limit = world_size if world_size is not None else n_heads
    return [n for n in range(1, limit + 1)
            if (world_size is None or world_size % n == 0) and n_heads % n == 0
            and (n_kv_heads % n == 0 or n % n_kv_heads == 0) and all(w % n == 0 for w in divides)]


def _moe_widths(spec: ArchSpec) -> Tuple[int, ...]:
    """The widths tensor parallelism splits evenly in a MoE: each expert's intermediate features
    (every rank runs every expert on its slice), and the shared expert's."""
    if spec.moe is None:
        return ()
    return tuple(w for w in (spec.moe.intermediate, spec.moe.shared_intermediate) if w)


def check_tp_size(config_or_spec, tp_size: int, world_size: Optional[int] = None) -> None:
    """A clear ValueError unless `tp_size` can split this model over groups of a `world_size`-rank
    run: it must divide the world size and the attention heads, and either divide the KV heads
    or be a multiple of them (each KV head then replicated). Takes an HF config (no weights need
    loading) or an ArchSpec."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an integer >= 1, got {tp_size!r}")
    if world_size is not None and world_size % tp_size:
        divisors = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world_size} (groups are "
                         f"tp_size consecutive ranks); valid choices: {divisors}")
    if tp_size == 1:
        return
    spec = config_or_spec if isinstance(config_or_spec, ArchSpec) else spec_for(config_or_spec)
    h, hkv = spec.n_heads, spec.n_kv_heads
    widths = _moe_widths(spec)
    valid = valid_tp_sizes(h, hkv, world_size, widths)
    where = f" and the world size {world_size}" if world_size is not None else ""
    if spec.q_norm is not None and not spec.qk_norm_per_head:
        raise ValueError(f"tp_size={tp_size}: {spec.family}'s q/k norms span all attention heads, which "
                         "tensor parallelism splits (a cross-rank reduction inside the norm is not "
                         "implemented); valid choices for this model: [1]")
    for what, w in zip(("experts' intermediate", "shared expert's intermediate"), widths):
        if w % tp_size:
            raise ValueError(f"tp_size={tp_size} does not divide the {what} width {w} ({spec.family}: every "
                             f"rank runs every expert on an equal slice of it); valid choices for this "
                             f"model{where}: {valid}")
    if h % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the model's {h} attention heads "
                         f"({spec.family}); valid choices for this model{where}: {valid}")
    if hkv % tp_size and tp_size % hkv:
        raise ValueError(f"tp_size={tp_size} cannot share the model's {hkv} KV heads ({spec.family}): it "
                         f"must divide them or be a multiple of them (each KV head then replicated on "
                         f"tp_size / {hkv} ranks); valid choices for this model{where}: {valid}")


# ---------------------------------------------------------------------------------- the group

def _split(n: int, parts: int, i: int) -> Tuple[int, int]:
    """The i-th of `parts` near-equal contiguous pieces of range(n)."""
    return n * i // parts, n * (i + 1) // parts


class TPGroup:
    """This rank's tensor-parallel group (N consecutive ranks) and the collectives over it."""

    def __init__(self, size: int, device: torch.device):
        from fastrlhf.utils.distributed import tensor_parallel_group
        if not dist.is_initialized():
            raise ValueError(f"tp_size={size} needs torch.distributed initialized (launch with torchrun or "
                             "deepspeed; fastrlhf.utils.distributed.init_distributed() joins the group)")
        world = dist.get_world_size()
        if world % size:
            check_tp_size(None, size, world)  # raises the world-size error
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.size, self.device = size, device
        self.global_rank = dist.get_rank()
        self.rank = self.global_rank % size
        self.group = tensor_parallel_group(size, backend)
        self.rows: List[int] = []         # prompts per rank of the current generate call
        self.vocab_sizes: List[int] = []  # each rank's vocabulary slice (vocabulary-parallel lm_head)

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    # -- rows of the union batch ---------------------------------------------------------------
    @property
    def own(self) -> slice:
        start = sum(self.rows[:self.rank])
        return slice(start, start + self.rows[self.rank])

    def share_tokens(self, tok: torch.Tensor) -> torch.Tensor:
        """This rank's chosen tokens [B_r] -> every rank's, in rank order [sum B_i]."""
        width = max(self.rows)
        buf = tok.new_zeros(width)
        buf[:tok.shape[0]] = tok
        parts = self.all_gather(buf)
        return torch.cat([p[:n] for p, n in zip(parts, self.rows)])

    def exchange_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel logits: `local` [B_union, ..., V_r] (this rank's vocabulary slice of
        every row) -> [B_own, ..., V] (every slice of this rank's rows), by one all-to-all."""
        local = local.contiguous()  # rows of each rank are then contiguous in the flat buffer
        inner = local[0].numel() // local.shape[-1] if local.shape[0] else 0
        mine, mid = self.rows[self.rank], tuple(local.shape[1:-1])
        recv_sizes = [mine * inner * v for v in self.vocab_sizes]
        out = local.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, local.view(-1), output_split_sizes=recv_sizes,
                               input_split_sizes=[n * inner * local.shape[-1] for n in self.rows],
                               group=self.group)
        recvs = [c.view((mine,) + mid + (v,)) for c, v in zip(out.split(recv_sizes), self.vocab_sizes)]
        return torch.cat(recvs, dim=-1)

    def gather_prompts(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                       pad_id: int, agreed: Sequence[int], problem: bool = False):
        """The union of the group's (left-padded) prompts, right-aligned to the longest, in rank order.
        `agreed` are values every rank must share (max_new_tokens, the EOS ids). A rank whose
        inputs failed its checks calls this with problem=True (and raises its own error after),
        so that the others raise too instead of waiting for it."""
        b, p = (0, 0) if problem else tuple(input_ids.shape)
        head = [1 if problem else 0, b, p, len(agreed)] + list(agreed)
        width = max(64, len(head))
        meta = torch.full((width,), -1, dtype=torch.int64, device=self.device)
        meta[:len(head)] = torch.tensor(head, dtype=torch.int64)
        metas = [m.tolist() for m in self.all_gather(meta)]
        if problem:
            return None
        bad = [i for i, m in enumerate(metas) if m[0]]
        if bad:
            raise ValueError(f"rank(s) {bad} of this tensor-parallel group rejected their generate() "
                             "arguments (see their error); the ranks of a group generate together")
        mine = metas[self.rank][3:4 + metas[self.rank][3]]
        if any(m[3:4 + m[3]] != mine for m in metas):
            raise ValueError("the ranks of a tensor-parallel group called generate with different "
                             "max_new_tokens or EOS ids; they generate together and must agree")
        self.rows = [m[1] for m in metas]
        if min(self.rows) < 1:
            raise ValueError(f"every rank of a tensor-parallel group needs at least one prompt; the group's "
                             f"batch sizes are {self.rows}")
        bmax, pmax = max(self.rows), max(m[2] for m in metas)
        ids = input_ids.new_full((bmax, pmax), pad_id)
        mask = attention_mask.new_zeros((bmax, pmax))
        ids[:b, pmax - p:], mask[:b, pmax - p:] = input_ids, attention_mask
        all_ids, all_mask = self.all_gather(ids), self.all_gather(mask)
        union_ids = torch.cat([t[:n] for t, n in zip(all_ids, self.rows)])
        union_mask = torch.cat([t[:n] for t, n in zip(all_mask, self.rows)])
        return union_ids, union_mask


# ---------------------------------------------------------------------------------- the shard plan

@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """Which heads each tp rank runs: q heads [q0, q1) and KV heads [k0, k1) per rank."""
    size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def local_heads(self) -> int:
        return self.n_heads // self.size

    @property
    def local_kv_heads(self) -> int:
        return self.n_kv_heads // self.size if self.n_kv_heads % self.size == 0 else 1

    def q_heads(self, r: int) -> Tuple[int, int]:
        return r * self.local_heads, (r + 1) * self.local_heads

    def kv_heads(self, r: int) -> Tuple[int, int]:
        if self.n_kv_heads % self.size == 0:
            return r * self.local_kv_heads, (r + 1) * self.local_kv_heads
        kv = self.q_heads(r)[0] // (self.n_heads // self.n_kv_heads)  # replicated: the one KV head
        return kv, kv + 1                                             # of this rank's q heads

    def local_spec(self, spec: ArchSpec, rank: int) -> ArchSpec:
        """The spec tp rank `rank` runs: its head counts, and its heads' ALiBi slopes."""
        q0, q1 = self.q_heads(rank)
        slopes = None if spec.alibi_slopes is None else spec.alibi_slopes[q0:q1]
        return dataclasses.replace(spec, n_heads=self.local_heads, n_kv_heads=self.local_kv_heads,
                                   alibi_slopes=slopes)


def _merge(ranges) -> Ranges:
    out: List[List[int]] = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _per_rank(n: int, fn: Callable[[int], Sequence[Tuple[int, int]]]) -> Selection:
    return tuple(_merge(fn(r)) for r in range(n))


class ShardPlan:
    """The row / column selections of every projection, for every tp rank."""

    def __init__(self, spec: ArchSpec, size: int):
        self.spec, self.size = spec, size
        self.heads = HeadPlan(size, spec.n_heads, spec.n_kv_heads, spec.head_dim)
        hp, d = self.heads, spec.head_dim
        self.q = _per_rank(size, lambda r: [tuple(x * d for x in hp.q_heads(r))])
        self.kv = _per_rank(size, lambda r: [tuple(x * d for x in hp.kv_heads(r))])
        hq, hkv = spec.n_heads, spec.n_kv_heads
        self.qkv_split = _per_rank(size, lambda r: [
            tuple(x * d for x in hp.q_heads(r)),
            tuple((hq + x) * d for x in hp.kv_heads(r)),
            tuple((hq + hkv + x) * d for x in hp.kv_heads(r))])
        self.qkv_grouped = _per_rank(size, self._grouped)

    def _grouped(self, r: int):
        """[Hkv, g + 2, D] rows (NeoX, Falcon): per local KV head, its q heads of this rank, k, v."""
        hp, d = self.heads, self.spec.head_dim
        g = hp.n_heads // hp.n_kv_heads
        q0, q1 = hp.q_heads(r)
        out = []
        for j in range(*hp.kv_heads(r)):
            base = j * (g + 2) * d
            a, b = max(q0, j * g) - j * g, min(q1, (j + 1) * g) - j * g
            out += [(base + a * d, base + b * d), (base + g * d, base + (g + 2) * d)]
        return out

    def features(self, n: int) -> Selection:
        """An even split of n features (MLP intermediate, vocabulary) over the ranks."""
        return _per_rank(self.size, lambda r: [_split(n, self.size, r)])

    def fused_features(self, n: int) -> Selection:
        """[gate | up] rows of a fused projection with n features each."""
        return _per_rank(self.size, lambda r: [_split(n, self.size, r),
                                                tuple(n + x for x in _split(n, self.size, r))])


# ---------------------------------------------------------------------------------- reading shards

def _shape(p: torch.Tensor) -> Tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and getattr(p, "ds_tensor", None) is not None


class ShardReader:
    """This tp rank's slices of parameters: views / one-time slices of full tensors, or, for ZeRO-3
    partitions, exactly the slice's elements moved by one all-to-all over the partition group.
    Results are cached per (parameter, selection), so a tied lm_head reuses the embedding slice."""

    def __init__(self, tp_rank: int, tp_size: int, device: torch.device):
        self.tp_rank, self.tp_size, self.device = tp_rank, tp_size, device
        self._cache: Dict[tuple, torch.Tensor] = {}
        self.gathered_bytes = 0  # bytes moved in from ZeRO-3 partitions (for the memory report)

    def whole(self, p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if p is None:
            return None
        return self.take(p, 0, tuple(((0, _shape(p)[0]),) for _ in range(self.tp_size)))

    def take(self, p: torch.Tensor, dim: int, sel: Selection) -> torch.Tensor:
        key = (id(p), dim, sel)
        if key not in self._cache:
            if _partitioned(p) and len(_shape(p)) == 3:
                t = self._take_partitioned_3d(p, dim, sel)
                self.gathered_bytes += t.numel() * t.element_size()
            elif _partitioned(p):
                t = self._take_partitioned(p, dim, sel)
                self.gathered_bytes += t.numel() * t.element_size()
            else:
                t = _slice(p.data, dim, sel[self.tp_rank])
            self._cache[key] = t
        return self._cache[key]

    def _take_partitioned_3d(self, p: torch.Tensor, dim: int, sel: Selection) -> torch.Tensor:
        """A fused experts parameter [E, A, B]: the same flat-index selection as a 2-D parameter
        [E, A * B] (dim 1: ranges scaled by B) or [E * A, B] (dim 2)."""
        e, a, b = _shape(p)
        if dim == 0:
            shape, dim2, sel2 = (e, a * b), 0, sel
        elif dim == 1:
            shape, dim2 = (e, a * b), 1
            sel2 = tuple(tuple((x * b, y * b) for x, y in r) for r in sel)
        else:
            shape, dim2, sel2 = (e * a, b), 1, sel
        flat = self._take_partitioned(p, dim2, sel2, shape=shape)
        width = sum(y - x for x, y in sel[self.tp_rank])
        return flat.reshape((width, a, b) if dim == 0 else (e, width, b) if dim == 1 else (e, a, width))

    def _take_partitioned(self, p: torch.Tensor, dim: int, sel: Selection,
                          shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
        if getattr(p.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
            # partitions on NVMe: gather this parameter alone, slice, release it at once
            import deepspeed
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return _slice(p.data.reshape(shape or p.data.shape), dim, sel[self.tp_rank]).to(
                    self.device, copy=True)
        shape = shape or _shape(p)
        if len(shape) > 2 or (dim == 1 and len(shape) != 2):
            raise ValueError(f"tensor parallelism slices 1-D or 2-D parameters, got shape {shape}")
        group = getattr(p, "ds_process_group", None) or dist.group.WORLD
        members = dist.get_world_size(group)
        me = dist.get_rank(group)
        numel, part = p.ds_numel, p.ds_tensor.ds_numel
        bounds = [(min(i * part, numel), min((i + 1) * part, numel)) for i in range(members)]
        count = _counter(shape, dim)
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        s, e = bounds[me]
        local = p.ds_tensor.reshape(-1)[:e - s].to(comm)
        sends, send_sizes = [], []
        for j in range(members):
            need = sel[dist.get_global_rank(group, j) % self.tp_size]
            piece = _pick(local, s, shape, dim, need)
            sends.append(piece)
            send_sizes.append(piece.numel())
        mine = sel[self.tp_rank]
        recv_sizes = [count(mine, b) - count(mine, a) for a, b in bounds]
        out = torch.empty(sum(recv_sizes), dtype=local.dtype, device=comm)
        dist.all_to_all_single(out, torch.cat(sends), output_split_sizes=recv_sizes,
                               input_split_sizes=send_sizes, group=group)
        width = sum(b - a for a, b in mine)
        out = out.view(width, *shape[1:]) if dim == 0 else out.view(shape[0], width)
        return out.to(self.device)


def _slice(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    """A view for one range, a one-time copy for several."""
    if len(ranges) == 1 and ranges[0] == (0, t.shape[dim]):
        return t
    pieces = [t.narrow(dim, a, b - a) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _counter(shape: Tuple[int, ...], dim: int) -> Callable[[Ranges, int], int]:
    """count(ranges, x): how many of the flat indices < x lie in the selection."""
    row = 1
    for n in shape[1:]:
        row *= n
    if dim == 0:
        return lambda ranges, x: sum(min(max(x, a * row), b * row) - a * row for a, b in ranges)

    def count(ranges: Ranges, x: int) -> int:
        full, rest = divmod(x, row)
        return full * sum(b - a for a, b in ranges) + sum(min(max(rest - a, 0), b - a) for a, b in ranges)
    return count


def _pick(local: torch.Tensor, start: int, shape: Tuple[int, ...], dim: int, ranges: Ranges) -> torch.Tensor:
    """The elements of a flat partition (covering flat indices [start, start + len)) that lie in
    the selection, in flat order."""
    n = local.numel()
    row = 1
    for k in shape[1:]:
        row *= k
    if dim == 0:
        pieces = []
        for a, b in ranges:
            lo, hi = max(a * row, start), min(b * row, start + n)
            if hi > lo:
                pieces.append(local[lo - start:hi - start])
        return torch.cat(pieces) if pieces else local[:0]
    col = torch.arange(start, start + n, device=local.device) % row
    keep = torch.zeros(n, dtype=torch.bool, device=local.device)
    for a, b in ranges:
        keep |= (col >= a) & (col < b)
    return local[keep]


# ---------------------------------------------------------------------------------- building weights

def shard_linear(module: nn.Module, reader: ShardReader, *, out: Optional[Selection] = None,
                 inp: Optional[Selection] = None, reduce: Optional[Callable] = None,
                 backend: Optional[str] = None) -> Linear:
    """The generation Linear of this rank's shard: output rows `out` (column-parallel) or input
    columns `inp` (row-parallel, with `reduce` summing the partial products), LoRA fused into a
    new buffer of the shard's size (the training weights are never written)."""
    parts = linear_parts(module)
    w_out_dim, w_in_dim = (1, 0) if parts.transposed else (0, 1)
    if out is not None:
        w = reader.take(parts.weight, w_out_dim, out)
        bias = None if parts.bias is None else reader.take(parts.bias, 0, out)
        lora = [(reader.whole(a), reader.take(b, 0, out), s) for a, b, s in parts.lora]
    elif inp is not None:
        w = reader.take(parts.weight, w_in_dim, inp)
        bias = reader.whole(parts.bias)
        lora = [(reader.take(a, 1, inp), reader.whole(b), s) for a, b, s in parts.lora]
    else:
        w, bias = reader.whole(parts.weight), reader.whole(parts.bias)
        lora = [(reader.whole(a), reader.whole(b), s) for a, b, s in parts.lora]
    if not lora:
        return Linear(w, bias, parts.transposed, reduce=reduce)
    fused = _fuse_all(w if w.is_contiguous() else w.contiguous(), lora, parts.transposed, backend)
    return Linear(fused, bias, parts.transposed, fused_lora=True, reduce=reduce)


def shard_norm(module: nn.Module, reader: ShardReader, offset: float = 0.0) -> Norm:
    w = reader.whole(getattr(module, "weight", None))
    b = reader.whole(getattr(module, "bias", None))
    if w is not None and offset:
        w = w.float() + offset  # fp32, as HF computes (1.0 + w.float())
    return Norm(w, b)


def _out_features(module: nn.Module) -> int:
    parts = linear_parts(module, fuse_lora=False)
    shape = _shape(parts.weight)
    return shape[1] if parts.transposed else shape[0]


def shard_moe(layer: nn.Module, spec: MoESpec, plan, reader, group, backend) -> MoEWeights:
    """This tensor-parallel rank's slice of every expert (gate/up rows [g_r | u_r] of the
    intermediate dimension, the matching down columns) and of the shared expert; the router whole.
    ZeRO-3 partitions are read slice by slice (tensor_parallel.ShardReader); LoRA factors are cut
    to the slice before the product."""
    def param(module, name, dim=None, sel=None):
        p, lora = param_parts(module, name)
        w = reader.whole(p) if sel is None else reader.take(p, dim, sel)
        if not lora:
            return w
        mine = sel[reader.tp_rank] if sel is not None else None
        cut = None if mine is None else (  # lhs [E, out, r] rows or rhs [E, r, in] columns
            (lambda l, r: (_slice(l, 1, mine), r)) if dim == 1 else (lambda l, r: (l, _slice(r, 2, mine))))
        return fuse_param_lora(w, [(reader.whole(a), reader.whole(b), s, e) for a, b, s, e in lora], cut)

    router = param(require_path(layer, spec.router, "MoE router"), "weight")
    experts = require_path(layer, spec.experts, "MoE experts")
    gate_up = param(experts, "gate_up_proj", 1, plan.fused_features(spec.intermediate))
    down = param(experts, "down_proj", 2, plan.features(spec.intermediate))
    shared = None
    if spec.shared_expert is not None:
        feats = plan.features(spec.shared_intermediate)
        mod = lambda name: require_path(layer, f"{spec.shared_expert}.{name}", "linear")  # noqa: E731
        sdown = shard_linear(mod("down_proj"), reader, inp=feats, backend=backend)
        if sdown.bias is not None:
            raise ValueError("a shared expert with a down-projection bias cannot be tensor-parallel here "
                             "(the bias would be summed over the ranks); use tp_size=1")
        shared = SharedExpert(shard_linear(mod("gate_proj"), reader, out=feats, backend=backend),
                              shard_linear(mod("up_proj"), reader, out=feats, backend=backend), sdown,
                              None if spec.shared_expert_gate is None else shard_linear(
                                  require_path(layer, spec.shared_expert_gate, "linear"), reader, backend=backend))
    return MoEWeights(router, gate_up, down, shared, reduce=group.all_reduce_)


def build_tp_layer(layer: nn.Module, spec: ArchSpec, plan: ShardPlan, reader: ShardReader,
                   group: TPGroup, *, fuse_projections: bool, backend: Optional[str]):
    from .decoder import LayerWeights
    mod = lambda p: require_path(layer, p, "linear")  # noqa: E731
    col = lambda p, sel: shard_linear(mod(p), reader, out=sel, backend=backend)  # noqa: E731
    row = lambda p, sel: shard_linear(mod(p), reader, inp=sel, reduce=group.all_reduce_,  # noqa: E731
                                      backend=backend)
    q = k = v = qkv = None
    if spec.qkv is not None:
        qkv = col(spec.qkv, plan.qkv_grouped if spec.qkv_layout == "grouped" else plan.qkv_split)
    else:
        q, k, v = col(spec.q, plan.q), col(spec.k, plan.kv), col(spec.v, plan.kv)
        if fuse_projections:
            qkv, q, k, v = concat_linears([q, k, v]), None, None, None
    gate = up = gate_up = down = moe = None
    if spec.moe is not None and get_path(layer, spec.moe.experts) is not None:
        moe = shard_moe(layer, spec.moe, plan, reader, group, backend)
    elif spec.gate_up is not None:
        inter = _out_features(mod(spec.gate_up)) // 2
        gate_up = col(spec.gate_up, plan.fused_features(inter))
    else:
        inter = _out_features(mod(spec.up))
        up = col(spec.up, plan.features(inter))
        gate = col(spec.gate, plan.features(inter)) if spec.gate else None
        if gate is not None and fuse_projections:
            gate_up, gate, up = concat_linears([gate, up]), None, None
    if moe is None:
        down = row(spec.down, plan.features(inter))
    off = spec.norm_offset
    norm = lambda p: None if p is None else shard_norm(require_path(layer, p, "norm"), reader, off)  # noqa: E731
    post = get_path(layer, spec.post_norm) if spec.post_norm else None
    return LayerWeights(
        in_norm=norm(spec.input_norm), post_norm=None if post is None else shard_norm(post, reader, off),
        qkv=qkv, q=q, k=k, v=v, o=row(spec.o, plan.q), up=up, gate=gate, gate_up=gate_up,
        down=down, q_norm=norm(spec.q_norm), k_norm=norm(spec.k_norm),
        attn_out_norm=norm(spec.attn_out_norm), mlp_out_norm=norm(spec.mlp_out_norm), moe=moe)


def build_tp_model(model: nn.Module, spec: ArchSpec, plan: ShardPlan, reader: ShardReader,
                   group: TPGroup, *, vocab_parallel: bool, fuse_projections: bool,
                   backend: Optional[str], per_layer: bool = True):
    """ModelWeights of this rank's shards (layers built now, or left to a layer iterator)."""
    from .decoder import ModelWeights, lm_head_module
    backbone = require_path(model, spec.backbone, "decoder stack")
    embed_p = require_path(backbone, spec.embed, "token embedding").weight
    vocab = _shape(embed_p)[0]
    vocab_sel = plan.features(vocab)
    group.vocab_sizes = [b - a for ((a, b),) in vocab_sel]
    embed = reader.take(embed_p, 0, vocab_sel) if vocab_parallel else reader.whole(embed_p)
    head = lm_head_module(model, spec)
    head_vocab = _out_features(head)
    if vocab_parallel and head_vocab != vocab:
        raise ValueError(f"the lm_head has {head_vocab} outputs but the embedding {vocab} rows; the "
                         "vocabulary-parallel split needs them equal (use EngineConfig(tp_lm_head='replicated'))")
    lm_head = shard_linear(head, reader, out=vocab_sel if vocab_parallel else None, backend=backend)
    pos = get_path(backbone, spec.pos_embed)
    fnorm = get_path(backbone, spec.final_norm) if spec.final_norm else None
    enorm = None if spec.embed_norm is None else shard_norm(
        require_path(backbone, spec.embed_norm, "norm"), reader)
    proj = lambda p: None if p is None else shard_linear(  # noqa: E731
        require_path(backbone, p, "projection"), reader, backend=backend)
    layers = []
    if per_layer:
        layers = [build_tp_layer(l, spec, plan, reader, group, fuse_projections=fuse_projections,
                                 backend=backend)
                  for l in require_path(backbone, spec.layers, "layer list")]
    return ModelWeights(
        embed=embed, pos_embed=None if pos is None else reader.whole(pos.weight),
        final_norm=None if fnorm is None else shard_norm(fnorm, reader, spec.norm_offset),
        lm_head=lm_head, project_in=proj(spec.project_in), project_out=proj(spec.project_out),
        layers=layers, embed_norm=enorm, embed_scale=None if spec.embed_scale is None else torch.tensor(
            spec.embed_scale, dtype=embed.dtype, device=embed.device),
        vocab_range=vocab_sel[group.rank][0] if vocab_parallel else None)


def weights_nbytes(weights, layers: Optional[list] = None) -> int:
    """Bytes of the distinct tensors a ModelWeights reads (views of one storage counted by their
    own extent): what this rank's generation forward touches."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor):
            return
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, (Linear, Norm)) or dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
    walk(weights)
    for lw in layers or []:
        walk(lw)
    return total

"""HybridEngine: fast generation on the training weights of an HF causal LM.

    engine = HybridEngine(model_or_deepspeed_engine, tokenizer, EngineConfig())
    out = engine.generate(input_ids, attention_mask, max_new_tokens=64, do_sample=True)
    with engine.session(...) as sess: ...   # sequences that stop, take appended tokens, go on

Inference mode (`eval()`, the `inference()` context, or implicitly around `generate`): gather
ZeRO-3 partitions, read weight views and fuse LoRA into side buffers; `train()` drops all of it
(the training parameters were never written) and releases gathered partitions.

Generation runs on a paged KV cache (kv_cache.py) shared by all sequences, scheduled by
scheduler.py (continuous batching, shared prompts, preemption), computed by loop.py and driven
by session.py; `generate` is a session whose sequences finish at their first stop.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedModel


from .arch_spec import ArchSpec, spec_for
from .decoder import Decoder, ModelWeights, build_layer_weights, build_model_weights
from .weights import get_path
from .engine_types import EngineConfig, GenerationOutput
from .kv_cache import PagedKVCache, blocks_for, growth_cap_blocks, pool_blocks
from .sampling import SamplingParams, make_generator, sequence_seeds
from .session import RolloutSession, _check_group
from .zero3 import gathered, model_is_zero3


def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a DeepSpeed engine / DDP wrapper / PEFT model."""
    m = model
    # DeepSpeedEngine forwards unknown attributes to its module, so test the type, not attributes
    while not isinstance(m, PreTrainedModel) and isinstance(getattr(m, "module", None), nn.Module):
        m = m.module
    get_base = getattr(m, "get_base_model", None)
    if callable(get_base) and type(m).__name__.startswith("Peft"):
        m = get_base()
    return m


def _as_id_list(x) -> List[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


class HybridEngine:
    def __init__(self, model: nn.Module, tokenizer=None, config: Optional[EngineConfig] = None):
        self.config = config or EngineConfig()
        self.config.validate()
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.spec: Optional[ArchSpec] = None
        if self.config.fallback is None:
            self.spec = spec_for(self.model.config)  # clear error for unsupported families
        # tensor parallelism: checked before anything is built; the decoder and the KV cache then
        # see this rank's head counts (local_spec)
        self.tp = self._plan = self._reader = None
        self.local_spec = self.spec
        if self.config.tp_size > 1:
            from .tensor_parallel import ShardPlan, TPGroup, check_tp_size
            import torch.distributed as dist
            check_tp_size(self.spec, self.config.tp_size,
                          dist.get_world_size() if dist.is_initialized() else None)
            self.tp = TPGroup(self.config.tp_size, self.device)
            self._plan = ShardPlan(self.spec, self.config.tp_size)
            self.local_spec = self._plan.heads.local_spec(self.spec, self.tp.rank)
        self._weights: Optional[ModelWeights] = None
        self._stack: Optional[contextlib.ExitStack] = None
        self._cache: Optional[PagedKVCache] = None
        self._decoder: Optional[Decoder] = None
        self._tables = None  # (length, {key: (cos, sin)}, device)
        self._decoder_tables = None  # the tables the current decoder was built with
        self.last_stats: Dict[str, int] = {}  # of the last generate(): steps, preemptions, peak KV blocks...

    # -- facts about the model --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def in_inference(self) -> bool:
        return self._stack is not None

    # -- mode switches -----------------------------------------------------------------------
    def eval(self) -> "HybridEngine":
        """Enter inference mode: gather ZeRO-3 params, build weight views, fuse LoRA."""
        if self._stack is not None:
            return self
        stack = contextlib.ExitStack()
        try:
            if self.spec is None:  # HF fallback: gather for generate, nothing else to build
                if self.config.zero3_gather == "all":
                    stack.enter_context(gathered(self.model.parameters()))
            else:
                self._weights = self._build_weights(stack)
        except BaseException:
            stack.close()
            self._weights = None
            raise
        self._stack = stack
        return self

    def train(self, release_cache: bool = False) -> "HybridEngine":
        """Back to training mode: drop fused buffers and views, release gathered partitions."""
        self._weights = None
        self._decoder = None
        self._reader = None
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
        if release_cache:
            self.release_cache()
        return self

    @contextlib.contextmanager
    def inference(self):
        entered = not self.in_inference
        if entered:
            self.eval()
        try:
            yield self
        finally:
            if entered:
                self.train()

    def memory_footprint(self) -> Dict[str, int]:
        """Bytes this rank's generation holds, in inference mode: `weights` (the distinct tensors the
        forward reads: views of training parameters, fused/sliced buffers, gathered ZeRO-3 slices),
        `kv_cache` (its allocation), and `gathered` (of the weights, those moved in from ZeRO-3
        partitions under tensor parallelism)."""
        if self._weights is None:
            raise RuntimeError("memory_footprint() needs inference mode: call it inside engine.inference()")
        from .tensor_parallel import weights_nbytes
        cache = 0 if self._cache is None else self._cache.nbytes
        return {"weights": weights_nbytes(self._weights), "kv_cache": cache,
                "gathered": 0 if self._reader is None else self._reader.gathered_bytes}

    def release_cache(self) -> None:
        self._cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _build_weights(self, stack: contextlib.ExitStack) -> ModelWeights:
        spec, cfg = self.spec, self.config
        build = dict(fuse_projections=cfg.fuse_projections, backend=cfg.backend)
        layers = get_path(get_path(self.model, spec.backbone), spec.layers)
        if self.tp is not None:
            return self._build_tp_weights(layers, build)
        if cfg.zero3_gather == "layer" and model_is_zero3(self.model):
            in_layers = {id(p) for p in layers.parameters()}
            rest = [p for p in self.model.parameters() if id(p) not in in_layers]
            stack.enter_context(gathered(rest))
            weights = build_model_weights(self.model, spec, per_layer=False, **build)

            def layer_iter():
                for layer in layers:
                    with gathered(layer.parameters()):
                        yield build_layer_weights(layer, spec, **build)
            weights.layer_iter = layer_iter
            return weights
        stack.enter_context(gathered(self.model.parameters()))
        return build_model_weights(self.model, spec, **build)

    def _build_tp_weights(self, layers, build) -> ModelWeights:
        """This rank's shards: views / one-time slices of full weights, or exactly the slices of
        ZeRO-3 partitions (tensor_parallel.ShardReader); "layer" mode reads each layer's slices
        when the forward reaches it and drops them after."""
        from .tensor_parallel import ShardReader, build_tp_layer, build_tp_model
        tp, plan = self.tp, self._plan
        self._reader = ShardReader(tp.rank, tp.size, self.device)
        per_layer = not (self.config.zero3_gather == "layer" and model_is_zero3(self.model))
        weights = build_tp_model(self.model, self.spec, plan, self._reader, tp, per_layer=per_layer,
                                 vocab_parallel=self.config.tp_lm_head == "vocab_parallel", **build)
        if not per_layer:
            def layer_iter():
                for layer in layers:
                    yield build_tp_layer(layer, self.spec, plan, ShardReader(tp.rank, tp.size, self.device),
                                         tp, **build)
            weights.layer_iter = layer_iter
        return weights

    # -- rotary tables from the HF module (so rope-scaling variants are honoured) -------------
    def _rotary_tables(self, length: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{key: (cos, sin)}, fp32 [max(length, max_positions), rotary_dim // 2], one table per key of
        spec.layer_rotary (the layer type HF's rotary module takes; "" = its only table)."""
        spec = self.spec
        if not spec.rotary_dim:
            return {}
        if self._tables is not None and self._tables[0] >= length and self._tables[2] == self.device:
            return self._tables[1]
        length = max(length, spec.max_positions)
        backbone = get_path(self.model, spec.backbone)
        mod = get_path(backbone, spec.rotary_module)
        if mod is None and "." in spec.o:  # older transformers (Mistral < 4.48): one per attention layer
            layers = get_path(backbone, spec.layers)
            attn = spec.o.rsplit(".", 1)[0]
            mod = get_path(layers[0], f"{attn}.{spec.rotary_module}") if layers is not None and len(layers) else None
        if mod is None:
            raise ValueError(f"no rotary embedding module at {spec.backbone}.{spec.rotary_module}")
        x = torch.zeros(1, 1, spec.head_dim, dtype=torch.float32, device=self.device)
        pos = torch.arange(length, device=self.device)[None]
        tables = {}
        for key in sorted({k for k in spec.layer_rotary if k is not None} if spec.layer_rotary else {""}):
            with torch.no_grad():
                cos, sin = mod(x, pos, key) if key else mod(x, pos)
            if cos.shape[-1] != spec.rotary_dim:
                raise ValueError(f"rotary module gives dim {cos.shape[-1]}, spec expects {spec.rotary_dim}")
            half = spec.rotary_dim // 2
            # HF's tables are cat(freqs, freqs): the first half is the per-frequency table
            tables[key] = (cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous())
        self._tables = (length, tables, self.device)
        return tables

    # -- the paged KV pool (sizing rule: kv_cache.py) --------------------------------------------
    def _layout(self):
        sp = self.local_spec
        n_layers = len(get_path(get_path(self.model, sp.backbone), sp.layers))
        return n_layers, sp.n_kv_heads, self.config.kv_block_size, sp.head_dim, self.dtype, self.device

    def _ensure_pool(self, demand_blocks: int) -> PagedKVCache:
        """The pool for a call that may need `demand_blocks` at once: reused when it has the layout
        (grown to the demand when sized by rule), else allocated by the sizing rule."""
        cfg, layout = self.config, self._layout()
        cache = self._cache
        fixed = cfg.kv_cache_tokens is not None
        want = pool_blocks(cfg.kv_cache_tokens, cfg.kv_block_size, demand_blocks)
        if cache is not None and cache.fits(*layout):
            if fixed and cache.num_blocks != want and cache.allocator.num_used == 0:
                cache = None  # the configured size changed
            elif not fixed and cache.num_blocks < want:
                self._grow_pool(want)
        if cache is None or not cache.fits(*layout):
            self._cache = None  # free the old one before allocating
            n_layers, hkv, bs, d, dtype, device = layout
            if not fixed and device.type == "cuda":
                one = PagedKVCache(n_layers, 1, hkv, bs, d, dtype, device).block_bytes
                want = max(1, min(want, growth_cap_blocks(cfg.kv_cache_memory_fraction, one, 0, device)))
            self._cache = PagedKVCache(n_layers, want, hkv, bs, d, dtype, device)
        return self._cache

    def _grow_pool(self, min_blocks: int) -> bool:
        """Grow a pool sized by rule to at least `min_blocks` (doubling); False when it is fixed
        (kv_cache_tokens) or at its device-memory cap."""
        cache, cfg = self._cache, self.config
        if cfg.kv_cache_tokens is not None:
            return False
        new = max(min_blocks, 2 * cache.num_blocks)
        cap = growth_cap_blocks(cfg.kv_cache_memory_fraction, cache.block_bytes, cache.num_blocks, self.device)
        if cap is not None:
            if cap < min_blocks:
                return False
            new = min(new, cap)
        cache.grow(new)
        return True

    def _pool(self):
        return _PoolHandle(self)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 64, do_sample: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 min_new_tokens: int = 0, eos_token_id: Union[int, Sequence[int], None] = None,
                 pad_token_id: Optional[int] = None,
                 generator: Union[torch.Generator, int, Sequence[int], None] = None,
                 return_logprobs: bool = False, release_cache: bool = False,
                 num_return_sequences: int = 1) -> GenerationOutput:
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, min_new_tokens)
        try:
            params.validate()
            g = _check_group(num_return_sequences)
            input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, max_new_tokens)
            eos_ids = _as_id_list(eos_token_id if eos_token_id is not None else self._default_eos())
            if pad_token_id is None:
                pad_token_id = self._default_pad(eos_ids)
            if self.spec is None:
                if isinstance(generator, (list, tuple, torch.Tensor)):
                    raise ValueError("per-row seeds need the engine's decoder; EngineConfig(fallback='hf') takes "
                                     "one seed or generator")
                gen = make_generator(generator, self.device)
            else:
                seeds = sequence_seeds(generator, input_ids.shape[0] * g, self.device)
                self._check_pool_fits(int(attention_mask.sum(-1).max()) + max_new_tokens)
        except (ValueError, TypeError):
            if self.tp is not None:  # tell the group first, so that no rank waits for this one
                self.tp.gather_prompts(None, None, 0, [], problem=True)
            raise
        own_prompt_len = input_ids.shape[1]
        if self.tp is not None:  # the group generates the union of its prompts
            input_ids, attention_mask = self.tp.gather_prompts(
                input_ids, attention_mask, pad_token_id, [max_new_tokens, g, len(eos_ids)] + eos_ids)
        entered = not self.in_inference
        if entered:
            self.eval()
        try:
            with torch.no_grad():
                if self.spec is None:
                    from .hf_fallback import hf_generate
                    return hf_generate(self.model, input_ids, attention_mask, max_new_tokens, params,
                                       eos_ids, pad_token_id, gen, return_logprobs, g)
                out = self._generate(input_ids, attention_mask, max_new_tokens, params, eos_ids,
                                     pad_token_id, seeds, g, return_logprobs)
                if self.tp is not None:  # this rank's rows without the union's extra left padding
                    out.sequences = out.sequences[:, input_ids.shape[1] - own_prompt_len:]
                return out
        finally:
            if entered:
                self.train()
            if release_cache:
                self.release_cache()

    def _check_pool_fits(self, length: int) -> None:
        cfg = self.config
        if cfg.kv_cache_tokens is not None and blocks_for(length, cfg.kv_block_size) > \
                blocks_for(cfg.kv_cache_tokens, cfg.kv_block_size):
            raise ValueError(f"EngineConfig(kv_cache_tokens={cfg.kv_cache_tokens}) is too small for one sequence "
                             f"of {length} tokens (longest prompt + max_new_tokens); raise kv_cache_tokens")

    def _lockstep(self):
        """ZeRO-3 layer-by-layer gathering on several ranks: every forward gathers over all ranks,
        so they step together (each with its own rows, or none) until all are idle."""
        if self._weights.layer_iter is not None and model_is_zero3(self.model):
            from fastrlhf.utils.distributed import all_ranks_true, get_world_size
            if get_world_size() > 1:
                return all_ranks_true
        return None

    def _generate(self, input_ids, attention_mask, max_new, params, eos_ids, pad_id, seeds, g, want_lp):
        b = input_ids.shape[0]
        mask = attention_mask.bool().cpu()
        prompts = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask)]
        longest = max(len(x) for x in prompts)
        n_seqs = b * g
        rows = min(n_seqs, self.config.max_batch_size or n_seqs)
        window = 1 if self.device.type == "cpu" else self.config.stop_check_every
        cache = self._ensure_pool(rows * blocks_for(longest + max_new + window, self.config.kv_block_size))
        cache.allocator.peak_used = cache.allocator.num_used
        owners, own = [0] * b, slice(0, b)
        seed_list = seeds
        if self.tp is not None:
            owners = [r for r, n in enumerate(self.tp.rows) for _ in range(n)]
            own = self.tp.own
            seed_list = [0] * (own.start * g) + seeds + [0] * ((b - own.stop) * g)
        sess = RolloutSession(self, params, eos_ids, want_lp, keep_on_stop=False, max_len=longest + max_new,
                              lockstep=self._lockstep())
        try:
            ids = sess._start(prompts, max_new, params.min_new_tokens, None, g, seed_list, owners)
            sess.run()
            mine = [sess.seqs[i] for i in ids[own.start * g:own.stop * g]]
            self.last_stats = dict(steps=sess.steps, preemptions=sess.scheduler.preemptions,
                                   prefill_tokens=sess.runner.prefill_tokens,
                                   peak_kv_blocks=cache.allocator.peak_used,
                                   peak_kv_bytes=cache.allocator.peak_used * cache.block_bytes,
                                   pool_bytes=cache.nbytes)
        finally:
            sess.close()
        new = [s.tokens[len(prompts[own.start + i // g]):] for i, s in enumerate(mine)]
        n = max(len(x) for x in new)
        out = torch.full((len(mine), n), pad_id, dtype=torch.long)
        lp = torch.zeros(len(mine), n, dtype=torch.float32) if want_lp else None
        for i, (s, toks) in enumerate(zip(mine, new)):
            out[i, :len(toks)] = torch.tensor(toks)
            if lp is not None:
                lp[i, :len(toks)] = torch.tensor(s.logprobs[len(s.tokens) - len(toks):])
        prompt_rows = input_ids[own].repeat_interleave(g, dim=0)
        sequences = torch.cat([prompt_rows, out.to(self.device)], dim=1)
        return GenerationOutput(sequences, None if lp is None else lp.to(self.device))

    def session(self, *, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                repetition_penalty: float = 1.0, eos_token_id: Union[int, Sequence[int], None] = None,
                return_logprobs: bool = True) -> RolloutSession:
        """A RolloutSession (session.py): sequences that generate until a stop, take appended
        tokens and continue without recomputing their past. Sampling options hold for the whole
        session; budgets, stops and seeds are given per sequence and turn."""
        if self.spec is None:
            raise ValueError("rollout sessions run on the engine's own decoder; EngineConfig(fallback='hf') "
                             "cannot continue sequences")
        if self.tp is not None:
            raise NotImplementedError("rollout sessions do not run under tensor parallelism yet (tp_size > 1); "
                                      "use generate(), or tp_size=1")
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, 0)
        params.validate()
        eos_ids = _as_id_list(eos_token_id if eos_token_id is not None else self._default_eos())
        max_len = self.spec.max_positions
        rows = self.config.max_batch_size or 16
        self._ensure_pool(rows * blocks_for(min(max_len, 256), self.config.kv_block_size))
        return RolloutSession(self, params, eos_ids, return_logprobs, keep_on_stop=True, max_len=max_len,
                              lockstep=None)

    def _default_eos(self):
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            return self.tokenizer.eos_token_id
        gc = getattr(self.model, "generation_config", None)
        return getattr(gc, "eos_token_id", None) if gc is not None else self.model.config.eos_token_id

    def _default_pad(self, eos_ids: List[int]) -> int:
        for src in (self.tokenizer, self.model.config):
            pid = getattr(src, "pad_token_id", None) if src is not None else None
            if pid is not None:
                return int(pid)
        if eos_ids:
            return eos_ids[0]
        raise ValueError("no pad_token_id: pass pad_token_id=..., or a tokenizer/model config with "
                         "a pad or eos token")

    def _check_inputs(self, input_ids, attention_mask, max_new_tokens):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, prompt_len] tensor of token ids")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        attention_mask = attention_mask.to(self.device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prompts must be LEFT-padded (the last column must be a real token for "
                             "every row); set tokenizer.padding_side = 'left'")
        if not bool(attention_mask.any(dim=-1).all()):
            raise ValueError("every prompt needs at least one real token")
        if self.spec is not None and self.spec.pos_embed is not None:
            total = input_ids.shape[1] + max_new_tokens
            if total > self.spec.max_positions:
                raise ValueError(f"prompt + max_new_tokens = {total} exceeds the model's "
                                 f"{self.spec.max_positions} learned positions")
        return input_ids, attention_mask

    def _decoder_for(self, total_len: int) -> Decoder:
        tables = self._rotary_tables(total_len)
        if self._decoder is None or self._decoder_tables is not tables:
            cos, sin = tables.get("", (None, None))
            self._decoder = Decoder(self.local_spec, self.device, self.config.backend, cos, sin,
                                    lean=self.config.lean_cpu_decode, tp=self.tp, rotary_tables=tables)
            self._decoder_tables = tables
        return self._decoder

    @torch.no_grad()
    def prefill_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Logits of every prompt position [B, P, V] from the engine's forward (for checks); 0 at pads."""
        from .loop import extend_batch
        from .scheduler import Sequence as Seq, Turn
        try:
            input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, 1)
        except (ValueError, TypeError):
            if self.tp is not None:  # tell the group first, so that no rank waits for this one
                self.tp.gather_prompts(None, None, 0, [], problem=True)
            raise
        if self.tp is not None:  # the union of the group's prompts; this rank's rows come back
            p_own = input_ids.shape[1]
            input_ids, attention_mask = self.tp.gather_prompts(input_ids, attention_mask, 0, [])
        with self.inference():
            b, p = input_ids.shape
            mask = attention_mask.bool()
            dec = self._decoder_for(p)
            n_layers, hkv, bs, d, dtype, device = self._layout()
            rows = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
            cache = PagedKVCache(n_layers, sum(blocks_for(len(r), bs) for r in rows), hkv, bs, d, dtype, device)
            seqs = [Seq(i, r, bytearray(len(r)), [], 0, Turn(1), p) for i, r in enumerate(rows)]
            for s in seqs:
                s.blocks = cache.allocator.allocate(blocks_for(len(s.tokens), bs))
            ids, pos, batch = extend_batch(seqs, bs, device)
            from .attention import PagedPackedAttention
            if self.tp is not None:  # the lm_head's rows are tokens here: this rank's are contiguous
                own = self.tp.own
                self.tp.rows = [sum(len(r) for r in rows[sum(self.tp.rows[:k]):sum(self.tp.rows[:k + 1])])
                                for k in range(self.tp.size)]
            logits = dec.packed(self._weights, ids, pos, PagedPackedAttention(dec, pos[None], cache, batch.slots, 0,
                                                                              None, batch))
            out_rows = range(b) if self.tp is None else range(own.start, own.stop)
            out = logits.new_zeros(len(out_rows), p, logits.shape[-1])
            sel = mask[own] if self.tp is not None else mask
            out[sel] = logits
            return out if self.tp is None else out[:, p - p_own:]


class _PoolHandle:
    """The engine's current pool as the scheduler sees it (growing replaces the cache's storage,
    never the handle)."""

    def __init__(self, engine: HybridEngine):
        self.engine = engine

    @property
    def allocator(self):
        return self.engine._cache.allocator

    def grow(self, min_blocks: int) -> bool:
        return self.engine._grow_pool(min_blocks)

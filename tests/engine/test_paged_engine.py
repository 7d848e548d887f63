"""The second-generation engine: paged KV cache, scheduler, continuous batching, shared prompts,
per-sequence sampling, the continuation API (RolloutSession) and their bad inputs.

Greedy identity with HF for every family (also with rows refilled, G > 1 answers and an
append-and-continue round) is in test_engine_arch.py; here one tiny Llama and the bundled model.
"""
import numpy as np
import pytest
import torch

from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
from fastrlhf.hybrid_engine.kv_cache import BlockAllocator, OutOfBlocks, blocks_for
from fastrlhf.hybrid_engine.sampling import counter_uniforms, sample_inverse_cdf, seed_key
from fastrlhf.hybrid_engine.scheduler import (APPENDED, GENERATED, PROMPT, RUNNING, WAITING, Scheduler, Sequence,
                                              Turn)
from conftest import build_tiny, left_padded_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module", params=["llama", "gemma3_text", "bloom"])
def lean_family(request, tmp_path_factory):
    """Llama; Gemma-3 (sliding windows of 5 on local layers, two rotary tables); Bloom (ALiBi)."""
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _engine(model, **kw):
    return HybridEngine(model, None, EngineConfig(backend="torch", **kw))


def _hf_greedy(model, tokens, new):
    ids = torch.tensor([tokens])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0].tolist()


# -- block allocator and scheduler (host bookkeeping, no model) -----------------------------------

class _Pool:
    def __init__(self, n, growable=False):
        self.allocator, self.growable = BlockAllocator(n), growable

    def grow(self, n):
        if self.growable:
            self.allocator.grow(n)
        return self.growable


def _seq(i, n_tokens, max_new=8):
    return Sequence(i, list(range(4, 4 + n_tokens)), bytearray(n_tokens), [0.0] * n_tokens, 0,
                    Turn(max_new, start=n_tokens), 1000)


def test_allocator_counts_references_and_frees_at_zero():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.num_free == 1 and a.peak_used == 3
    a.share(x[:2])
    a.free(x)
    assert a.num_free == 2 and a.refcount(0) == 1 and a.refcount(2) == 0
    a.free(x[:2])
    assert a.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([0])
    with pytest.raises(OutOfBlocks):
        a.allocate(5)


def test_forks_share_the_prompt_and_copy_only_the_partial_block():
    pool = _Pool(64)
    sched = Scheduler(pool, block_size=4, max_rows=None, continuous=True)
    leader = _seq(0, 10)
    forks = [_seq(i, 10) for i in (1, 2, 3)]
    for f in forks:
        f.fork_of = leader
    for s in [leader] + forks:
        sched.add(s)
    extend, decode, companions, copies = sched.schedule(window=1)
    # the prompt is computed once (the leader); the forks hold its blocks and draw from its logits
    assert extend == [leader] and decode == [] and companions == forks and not copies
    assert all(f.blocks == leader.blocks[:3] and f.num_cached == 10 for f in forks)
    for s in [leader] + forks:  # after that step: the prompt cached, one sampled token each
        s.num_cached, s.fork_of = 10, None
        s.tokens.append(99)
    shared = leader.blocks[2]
    extend, decode, companions, copies = sched.schedule(window=1)
    assert set(decode) == {leader} | set(forks) and not extend and not companions
    # token 10 goes into the prompt's last block (tokens 8, 9): three of the four holders copy it
    # first, the last one writes in place; the two full prompt blocks stay shared by all
    assert all(f.blocks[:2] == leader.blocks[:2] for f in forks)
    assert len(copies) == 3 and all(src == shared for src, _ in copies)
    assert len({s.blocks[2] for s in [leader] + forks}) == 4 and shared in {s.blocks[2] for s in [leader] + forks}
    assert pool.allocator.num_used <= blocks_for(10, 4) + 4  # <= 1/G of the repeated prompts + a block each


def test_a_fork_admitted_later_computes_only_the_last_prompt_token():
    pool = _Pool(64)
    sched = Scheduler(pool, block_size=4, max_rows=1, continuous=True)
    leader, fork = _seq(0, 10), _seq(1, 10)
    fork.fork_of = leader
    sched.add(leader)
    sched.add(fork)
    extend, _, companions, _ = sched.schedule(window=1)
    assert extend == [leader] and not companions  # one row: the fork waits
    leader.num_cached = 10
    sched.on_cached(leader, [fork])  # it takes the blocks of the prompt's first 9 tokens at once
    assert fork.blocks == leader.blocks[:3] and fork.num_cached == 9 and fork.fork_of is None
    leader.tokens.append(5)
    sched.stop(leader, "eos", keep=False)  # the source ends: the fork still holds the prompt
    assert pool.allocator.num_used == 3
    _, decode, _, copies = sched.schedule(window=1)
    assert decode == [fork] and copies == []  # the last holder writes token 9 in place


def test_out_of_blocks_preempts_the_newest_running_sequence():
    pool = _Pool(6)
    sched = Scheduler(pool, block_size=4, max_rows=None, continuous=True)
    a, b = _seq(0, 7), _seq(1, 7)
    sched.add(a)
    sched.add(b)
    extend, _, _, _ = sched.schedule(window=1)  # 2 blocks each (8 positions)
    assert extend == [a, b] and pool.allocator.num_free == 2
    for s in (a, b):
        s.num_cached = 7
        s.tokens += [50, 51]  # now 9 tokens: positions up to 9 need a third block each
        s.num_cached = 8
    sched.schedule(window=1)
    sched.schedule(window=1)
    a.tokens += [52] * 4
    a.num_cached = len(a.tokens) - 1  # a grows past 12: a fourth block, taken from b (newer)
    sched.schedule(window=1)
    assert a.status == RUNNING and b.status == WAITING and b.blocks == [] and b.num_cached == 0
    assert sched.waiting[0] is b and sched.preemptions == 1


def test_an_admission_never_preempts_and_a_lone_sequence_too_long_raises():
    pool = _Pool(3)
    sched = Scheduler(pool, block_size=4, max_rows=None, continuous=True)
    a, b = _seq(0, 9), _seq(1, 4)
    sched.add(a)
    sched.add(b)
    sched.schedule(window=1)
    assert sched.running == [a] and list(sched.waiting) == [b]
    a.tokens += [1] * 4
    a.num_cached = len(a.tokens) - 1
    with pytest.raises(OutOfBlocks, match="cannot hold one sequence"):
        sched.schedule(window=1)


def test_counter_uniforms_are_a_function_of_key_and_position_and_look_uniform():
    keys = [seed_key(s) for s in (1, 2, 1, 2 ** 61 + 5)]
    u = counter_uniforms(keys, [7, 7, 8, 7])
    assert u[0] != u[1] and u[0] != u[2] and u[0] != u[3] and seed_key(1) != seed_key(2)
    assert u[0] == counter_uniforms(keys[:1], [7])[0]  # alone or in a batch
    many = torch.from_numpy(counter_uniforms([seed_key(3)] * 20000, np.arange(20000)))
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.01
    hist = torch.histc(many, bins=10, min=0, max=1) / 20000
    assert (hist - 0.1).abs().max() < 0.015
    window = counter_uniforms(keys, np.array([[7, 7, 8, 7], [8, 8, 9, 8]]))  # two steps at once
    assert np.array_equal(window[0], u) and window[1][0] == u[2]


def test_inverse_cdf_sampling_follows_the_distribution_and_never_picks_zero_mass():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0, float("-inf")]])
    u = torch.from_numpy(counter_uniforms([seed_key(9)] * 30000, np.arange(30000)))
    toks = sample_inverse_cdf(logits.expand(30000, -1), u)
    freq = torch.bincount(toks, minlength=5).float() / 30000
    want = torch.softmax(logits[0], -1)
    assert freq[1] == 0 and freq[4] == 0 and torch.allclose(freq, want, atol=0.015)
    top = sample_inverse_cdf(logits, torch.tensor([1.0 - 2 ** -24]))
    assert top.item() == 3


# -- the engine ----------------------------------------------------------------------------------

def test_rows_refilled_static_batches_and_preemption_give_the_same_greedy_tokens(llama):
    ids, mask = left_padded_batch([6, 3, 9, 4, 7], pad_id=0, seed=11)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=[])
    ref = _engine(llama).generate(ids, mask, **kw).sequences
    for cfg in (dict(max_batch_size=2), dict(max_batch_size=2, continuous_batching=False),
                dict(kv_cache_tokens=48, kv_block_size=4)):
        engine = _engine(llama, **cfg)
        assert torch.equal(engine.generate(ids, mask, **kw).sequences, ref), cfg
        if "kv_cache_tokens" in cfg:
            assert engine.last_stats["preemptions"] > 0 and engine._cache.num_blocks == 12


def test_continuous_batching_refills_finished_rows_sooner_than_static_batches(llama):
    ids, mask = left_padded_batch([5, 6, 7, 8, 5, 6, 7, 8], pad_id=0, seed=12)
    probe = _engine(llama).generate(ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    eos_token_id=[]).sequences[:, ids.shape[1]:]
    eos = int(probe[1, 1])  # greedy emits it early in some rows: answers of very different lengths
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    cont, static = _engine(llama, max_batch_size=2), _engine(llama, max_batch_size=2, continuous_batching=False)
    a, b = cont.generate(ids, mask, **kw).sequences, static.generate(ids, mask, **kw).sequences
    assert torch.equal(a, b)
    assert cont.last_stats["steps"] < static.last_stats["steps"]


def test_seeded_sampling_does_not_depend_on_the_other_sequences(llama):
    ids, mask = left_padded_batch([5, 9, 4], pad_id=0, seed=13)
    kw = dict(max_new_tokens=16, temperature=1.3, top_p=0.95, pad_token_id=0, eos_token_id=[],
              return_logprobs=True)
    full = _engine(llama).generate(ids, mask, generator=[11, 22, 33], **kw)
    alone = _engine(llama).generate(ids[1:2, -9:], mask[1:2, -9:], generator=[22], **kw)
    assert torch.equal(full.sequences[1, -16:], alone.sequences[0, -16:])
    assert torch.allclose(full.logprobs[1], alone.logprobs[0], atol=1e-5)
    for cfg in (dict(max_batch_size=1), dict(max_batch_size=2, continuous_batching=False)):
        again = _engine(llama, **cfg).generate(ids, mask, generator=[11, 22, 33], **kw)
        assert torch.equal(again.sequences, full.sequences), cfg
    one_seed = _engine(llama).generate(ids, mask, generator=5, **kw).sequences
    assert torch.equal(_engine(llama, max_batch_size=2).generate(ids, mask, generator=5, **kw).sequences, one_seed)
    assert not torch.equal(one_seed, full.sequences)


def test_num_return_sequences_prefills_each_prompt_once_in_hf_order(llama):
    ids, mask = left_padded_batch([6, 10], pad_id=0, seed=14)
    engine = _engine(llama)
    out = engine.generate(ids, mask, max_new_tokens=10, num_return_sequences=3, generator=3, pad_token_id=0,
                          eos_token_id=[])
    assert out.sequences.shape == (6, ids.shape[1] + 10)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))
    assert len({tuple(r) for r in out.sequences[:3, -10:].tolist()}) == 3  # three different answers
    # each prompt computed once for its three answers
    assert engine.last_stats["prefill_tokens"] == 6 + 10
    repeated = _engine(llama).generate(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), max_new_tokens=10,
                                       generator=3, pad_token_id=0, eos_token_id=[])
    assert torch.equal(repeated.sequences, out.sequences)  # same seeds per row: the same answers
    greedy = engine.generate(ids, mask, max_new_tokens=8, num_return_sequences=2, do_sample=False,
                             pad_token_id=0, eos_token_id=[]).sequences
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[2], greedy[3])


def test_lean_paged_decode_equals_the_paged_ops(lean_family):
    """The CPU decode step (LeanPagedDecodeAttention) and the ops path give the same logits (also
    with windows that hide keys, per-layer rotary tables and ALiBi)."""
    from fastrlhf.hybrid_engine.attention import LeanPagedDecodeAttention, PagedBatch, PagedDecodeAttention
    from fastrlhf.hybrid_engine.kv_cache import PagedKVCache
    engine = _engine(lean_family)
    n_layers = engine._layout()[0]
    with engine.inference():
        dec = engine._decoder_for(64)
        sp = engine.spec
        g = torch.Generator().manual_seed(0)
        pool = PagedKVCache(n_layers, 9, sp.n_kv_heads, 4, sp.head_dim, torch.float32, torch.device("cpu"))
        pool.storage.normal_(generator=g)
        tables = torch.tensor([[3, 0, 7, -1], [5, 1, 2, 8]], dtype=torch.int32)
        lens = torch.tensor([10, 14], dtype=torch.int32)
        pos = lens.long() - 1
        slots = tables.long()[torch.arange(2), pos // 4] * 4 + pos % 4
        tok = torch.tensor([17, 42])
        outs = []
        for cls in (LeanPagedDecodeAttention, PagedDecodeAttention):
            cache = PagedKVCache(n_layers, 9, sp.n_kv_heads, 4, sp.head_dim, torch.float32, torch.device("cpu"))
            cache.storage.copy_(pool.storage)
            outs.append((dec.decode(engine._weights, tok, pos, cls(dec, pos, cache, PagedBatch(slots, tables, lens))),
                         cache.storage))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
        written = [(outs[i][1] != pool.storage).any(-1).nonzero().tolist() for i in range(2)]
        # [layer, k/v, block, head, row] of the new tokens only: blocks 7 and 8, rows 1 and 1
        assert written[0] == written[1] and {(w[2], w[4]) for w in written[0]} == {(7, 1), (8, 1)}


def test_lean_packed_step_equals_the_paged_ops(lean_family):
    """The CPU packed step (decode rows beside new and appended tokens: LeanPagedPackedAttention)
    and the ops path give the same logits and cache writes (also with windows, per-layer rotary
    tables and ALiBi)."""
    from fastrlhf.hybrid_engine.attention import LeanPagedPackedAttention, PagedPackedAttention
    from fastrlhf.hybrid_engine.kv_cache import PagedKVCache
    from fastrlhf.hybrid_engine.loop import extend_batch
    engine = _engine(lean_family)
    n_layers = engine._layout()[0]
    with engine.inference():
        dec, sp = engine._decoder_for(64), engine.spec
        pool = PagedKVCache(n_layers, 12, sp.n_kv_heads, 4, sp.head_dim, torch.float32, torch.device("cpu"))
        pool.storage.normal_(generator=torch.Generator().manual_seed(1))
        # two decode rows (10 and 5 cached tokens), a fresh prompt of 7, 3 tokens appended to 9 cached
        dec_tables = torch.tensor([[3, 0, 7], [5, 1, -1]], dtype=torch.int32)
        dec_pos = torch.tensor([10, 5])
        dec_slots = dec_tables.long()[torch.arange(2), dec_pos // 4] * 4 + dec_pos % 4
        from fastrlhf.hybrid_engine.attention import PagedBatch
        dec_batch = PagedBatch(dec_slots, dec_tables, (dec_pos + 1).to(torch.int32))
        fresh, appended = _seq(0, 7), _seq(1, 12)
        fresh.blocks, appended.blocks = [2, 4], [6, 8, 9]
        appended.num_cached = 9
        ids_e, pos_e, ext = extend_batch([fresh, appended], 4, torch.device("cpu"))
        ids = torch.cat([torch.tensor([17, 42]), ids_e])
        pos = torch.cat([dec_pos, pos_e])
        slots = torch.cat([dec_slots, ext.slots])
        last = torch.tensor([0, 1, 2 + 6, 2 + 9])
        outs = []
        for lean in (True, False):
            cache = PagedKVCache(n_layers, 12, sp.n_kv_heads, 4, sp.head_dim, torch.float32, torch.device("cpu"))
            cache.storage.copy_(pool.storage)
            attn = (LeanPagedPackedAttention(dec, pos, cache, slots, 2, dec_batch, ext) if lean else
                    PagedPackedAttention(dec, pos[None], cache, slots, 2, dec_batch, ext))
            outs.append((dec.packed(engine._weights, ids, pos, attn), cache.storage))
        assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
        assert outs[0][0][last].shape == (4, outs[0][0].shape[-1])


# -- the continuation API ------------------------------------------------------------------------

def test_append_and_continue_equals_generating_from_scratch(llama):
    engine = _engine(llama)
    with engine.session(do_sample=False, eos_token_id=[]) as sess:
        a, b = sess.start([[5, 6, 7, 8, 9], [11, 12, 13]], max_new_tokens=4)
        ends = sess.run()
        assert sorted(e.seq_id for e in ends) == [a, b] and all(e.reason == "length" for e in ends)
        first = sess.sequence(a).tokens
        sess.append(a, [20, 21, 22], max_new_tokens=5)
        cached_before = sess.scheduler.paused.get(b).num_cached
        sess.run([a])
        state = sess.sequence(a)
        assert sess.scheduler.paused[b].num_cached == cached_before  # b stayed where it was
        assert state.tokens == _hf_greedy(llama, first + [20, 21, 22], 5)
        assert state.kinds == [PROMPT] * 5 + [GENERATED] * 4 + [APPENDED] * 3 + [GENERATED] * 5
        assert all((lp is None) == (k != GENERATED) for lp, k in zip(state.logprobs, state.kinds))
        # only the appended tokens and the last sampled one were computed for the second turn
        assert sess.runner.prefill_tokens == 5 + 3 + 4
    assert engine._cache.allocator.num_used == 0


def test_session_logprobs_match_a_training_forward_over_the_whole_trajectory(llama):
    with _engine(llama).session(temperature=0.9, eos_token_id=[]) as sess:
        (s,) = sess.start([4, 9, 13, 7], max_new_tokens=6, seeds=[3])
        sess.run()
        sess.append(s, [30, 31], max_new_tokens=5)
        sess.run()
        st = sess.sequence(s)
    seq = torch.tensor([st.tokens])
    with torch.no_grad():
        lp = torch.log_softmax(llama(input_ids=seq).logits[0, :-1].float(), -1)
    ref = lp.gather(-1, seq[0, 1:, None])[:, 0]
    gen = [i for i, k in enumerate(st.kinds) if k == GENERATED]
    ours = torch.tensor([st.logprobs[i] for i in gen])
    assert (ours - ref[[i - 1 for i in gen]]).abs().max() < 1e-4


def test_stops_by_token_and_string_and_paused_sequences_leave_the_batch(tmp_path):
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    tok = load_tokenizer(None, padding_side="left")
    model = load_causal_lm(None, seed=1).eval()
    engine = HybridEngine(model, tok, EngineConfig(backend="torch"))
    prompt = tok.encode("Human: what is 2 plus 3?")
    with engine.session(eos_token_id=[]) as sess:  # sampled: the same seed gives the same text
        free = sess.start(prompt, max_new_tokens=12, seeds=[7])[0]
        sess.run()
        text = sess.sequence(free).tokens[len(prompt):]
        i = next(i for i in range(1, 12) if text[i] not in text[:i])  # a token seen first at i
        stop_tok, stop_str = text[i], tok.decode(text[3:5])
        a = sess.start(prompt, max_new_tokens=12, stop=[stop_tok], seeds=[7])[0]
        b = sess.start(prompt, max_new_tokens=12, stop=stop_str, seeds=[7])[0]
        c = sess.start(prompt, max_new_tokens=12, seeds=[7])[0]
        ends = {}
        while sess.busy:
            for e in sess.step():
                ends[e.seq_id] = e
                if e.seq_id == a:  # a paused sequence holds no row: the others step on without it
                    assert c in [s.seq_id for s in sess.scheduler.running]
        assert ends[a].reason == "stop" and ends[a].tokens == text[:i + 1]
        assert ends[b].reason == "stop" and stop_str in tok.decode(ends[b].tokens)
        assert len(ends[b].tokens) <= 5 and ends[c].reason == "length" and ends[c].tokens == text


# -- bad input: one line, before any work ----------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 24, -16, 1.5])
def test_block_size_must_be_a_power_of_two(llama, size):
    with pytest.raises(ValueError, match="kv_block_size must be a positive power of two"):
        HybridEngine(llama, None, EngineConfig(kv_block_size=size))


@pytest.mark.parametrize("field,value", [("kv_cache_tokens", 0), ("kv_cache_tokens", 64.0),
                                         ("kv_cache_memory_fraction", 0.0), ("kv_cache_memory_fraction", 1.5),
                                         ("max_batch_size", 0), ("max_batch_size", True),
                                         ("continuous_batching", "no")])
def test_cache_and_batch_options_are_checked_when_the_engine_is_built(llama, field, value):
    with pytest.raises(ValueError, match=f"EngineConfig.{field} must be .*got {value!r}"):
        HybridEngine(llama, None, EngineConfig(**{field: value}))


def test_cache_too_small_for_one_sequence_is_refused_before_work(llama):
    engine = _engine(llama, kv_cache_tokens=16, kv_block_size=8)
    ids, mask = left_padded_batch([9, 4], pad_id=0)
    with pytest.raises(ValueError, match="too small for one sequence of 19 tokens"):
        engine.generate(ids, mask, max_new_tokens=10, pad_token_id=0)
    assert engine._cache is None  # refused before anything was allocated
    with pytest.raises(ValueError, match="too few for one sequence"):
        with engine.session() as sess:
            sess.start([5] * 9, max_new_tokens=10)


def test_num_return_sequences_below_one_is_refused(llama):
    ids, mask = left_padded_batch([3, 4], pad_id=0)
    for g in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_return_sequences must be an int >= 1"):
            _engine(llama).generate(ids, mask, max_new_tokens=2, pad_token_id=0, num_return_sequences=g)


def test_append_to_an_unknown_finished_or_generating_sequence_or_past_the_end(llama):
    with _engine(llama).session(do_sample=False, eos_token_id=[]) as sess:
        a, b = sess.start([[5, 6, 7], [8, 9]], max_new_tokens=3)
        with pytest.raises(ValueError, match="still generating"):
            sess.append(a, [4], max_new_tokens=2)
        sess.run()
        with pytest.raises(KeyError, match="no sequence 99"):
            sess.append(99, [4], max_new_tokens=2)
        sess.finish(b)
        with pytest.raises(ValueError, match="finished"):
            sess.append(b, [4], max_new_tokens=2)
        with pytest.raises(ValueError, match="maximum position \\(128\\)"):
            sess.append(a, [4] * 122, max_new_tokens=2)
        with pytest.raises(TypeError, match="appended tokens must be a list of token ids"):
            sess.append(a, ["x"], max_new_tokens=2)


@pytest.mark.parametrize("stop", [[1.5], [None], [[3, 4]], [""], {"a": 1}, [-1]])
def test_stop_lists_take_token_ids_and_strings_only(llama, stop):
    with _engine(llama).session() as sess:
        with pytest.raises(TypeError, match="stop must be token ids"):
            sess.start([5, 6], max_new_tokens=2, stop=stop)
        assert not sess.busy


# -- on a GPU (skipped without CUDA; benchmarks/gpu_suite.sh runs them) -----------------------------

gpu = pytest.mark.gpu


@gpu
def test_gpu_graphs_with_refilled_rows_and_groups_equal_eager_and_hf(tmp_path):
    """CUDA-graph decode steps (rows bucketed, padded rows of length 0) with rows refilled and
    G answers per prompt: the tokens of eager steps and of HF greedy."""
    model = build_tiny("llama", tmp_path).cuda()
    ids, mask = left_padded_batch([5, 9, 3, 7, 6], pad_id=0, seed=21)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, num_return_sequences=2)
    graphs = HybridEngine(model, None, EngineConfig(max_batch_size=4)).generate(ids, mask, **kw).sequences
    eager = HybridEngine(model, None, EngineConfig(max_batch_size=4, cuda_graphs=False)).generate(
        ids, mask, **kw).sequences
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(graphs, eager)
    assert torch.equal(graphs[::2], ref) and torch.equal(graphs[1::2], ref)


@gpu
def test_gpu_sampling_does_not_depend_on_the_host_sync_interval(tmp_path):
    """Several decode steps between host syncs (stop_check_every) decode past some rows' EOS and
    throw those tokens away: the same sampled answers as syncing every step."""
    model = build_tiny("llama", tmp_path).cuda()
    ids, mask = left_padded_batch([5, 9, 3, 7], pad_id=0, seed=22)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=30, temperature=1.2, pad_token_id=0, eos_token_id=[5, 17, 40], generator=9,
              return_logprobs=True)
    outs = [HybridEngine(model, None, EngineConfig(stop_check_every=n, max_batch_size=3)).generate(ids, mask, **kw)
            for n in (1, 8)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-4)


@gpu
def test_gpu_append_and_continue_equals_generating_from_scratch(tmp_path):
    model = build_tiny("llama", tmp_path).cuda()
    with HybridEngine(model, None, EngineConfig()).session(do_sample=False, eos_token_id=[]) as sess:
        (a,) = sess.start([5, 6, 7, 8, 9, 10], max_new_tokens=7)
        sess.run()
        sess.append(a, [20, 21, 22], max_new_tokens=9)
        sess.run()
        ours = sess.sequence(a).tokens
    assert ours == _hf_greedy(model.cpu(), ours[:16], 9)

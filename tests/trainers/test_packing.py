"""Training without padding (--packing, --max_tokens_per_micro_batch): the packed layout and the
pass planner by hand, packed attention that never reaches across sequences (every tiny family, and
the probe that refuses one that does), then each trainer's loss and gradients packed (one row, and
several passes under a token budget) against padded, within fp32 tolerance, and whole runs."""
import dataclasses

import pytest
import torch

from fastrlhf.errors import ConfigError
from fastrlhf.rlhf import rl_math as M
from fastrlhf.rlhf.logprobs import shifted_logprobs
from fastrlhf.rlhf.packing import check_packed_attention, plan_passes, select_rows
from fastrlhf.utils.positions import position_ids_from_mask
from fastrlhf.utils.packing import PackedRows
from conftest import TINY_CONFIGS, padded_and_packed_logprobs, tiny_config


# --------------------------------------------------------------------------- layout and plan by hand

def test_packed_rows_by_hand():
    # row 0 left-padded (2 pads), row 1 right-padded, row 2 padded both sides, row 3 one token
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    ids = torch.arange(20).view(4, 5)
    rows = PackedRows.of(mask)
    assert rows.pack(ids).tolist() == [[2, 3, 4, 5, 6, 11, 12, 13, 19]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 0]]
    assert rows.cu_seqlens.tolist() == [0, 3, 5, 8, 9]
    assert rows.slots()[2].tolist() == [-1, 5, 6, 7, -1]
    back = rows.unpack(rows.pack(ids) * 10, fill=-1)
    torch.testing.assert_close(back, torch.where(mask.bool(), ids * 10, torch.full_like(ids, -1)))


def test_rows_sharing_a_prompt_hold_it_once_by_hand():
    """--share_prompts: rows 0, 2 and 3 share a left-padded prompt [_, 7, 8] (columns 0-2), row 1's
    differs. The row holds the prompt once (row 0's), the others point at it; each row still
    attends as its own sequence, prompt included (`grid`), and a shared entry's gradient adds up."""
    ids = torch.tensor([[0, 7, 8, 20, 21], [5, 6, 9, 30, 0], [0, 7, 8, 40, 0], [0, 7, 8, 50, 51]])
    mask = (ids > 0).long()
    rows = PackedRows.of(mask, ids, shared_prefix=3)
    assert rows.shared and rows.cu_seqlens is None
    assert rows.pack(ids).tolist() == [[7, 8, 20, 21, 5, 6, 9, 30, 40, 50, 51]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 2, 2, 3]]
    assert rows.slots().tolist() == [[-1, 0, 1, 2, 3], [4, 5, 6, 7, -1], [-1, 0, 1, 8, -1], [-1, 0, 1, 9, 10]]
    y = (rows.pack(ids) * 10).float().requires_grad_()
    back = rows.unpack(y, fill=-1)
    torch.testing.assert_close(back, torch.where(mask.bool(), ids * 10, torch.full_like(ids, -1)).float())
    back.sum().backward()
    assert y.grad.tolist() == [[3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    src, home, n, longest = rows.grid()
    assert (n, longest) == (4, 4)
    assert src.view(4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 8, 11], [0, 1, 9, 10]]  # 11: padding
    assert home.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 14, 15]
    # nothing to share: no prefix asked for, no two rows alike, or the prefix is all padding
    assert PackedRows.of(mask).num_tokens == 15 and not PackedRows.of(mask).shared
    assert not PackedRows.of(mask[:2], ids[:2], shared_prefix=3).shared
    assert not PackedRows.of(mask[[0, 2]], ids[[0, 2]], shared_prefix=1).shared


def test_passes_fit_the_budget_first_fit_decreasing_and_keep_pairs_together():
    # lengths 5 3 9 2 7, budget 10: 9 | 7+3 | 5+2
    assert plan_passes([5, 3, 9, 2, 7], 10) == [[2], [1, 4], [0, 3]]
    assert plan_passes([5, 3, 9, 2, 7], None) == [[0, 1, 2, 3, 4]]
    # pairs (0, 3) = 7, (1, 4) = 10, (2, 5) = 10 tokens; budget 17: pair 1 opens pass A, pair 2 does
    # not fit beside it (B), pair 0 does (A); a pass lists its chosen rows, then their twins
    assert plan_passes([5, 3, 9, 2, 7, 1], 17, pairs=True) == [[0, 1, 3, 4], [2, 5]]
    with pytest.raises(ConfigError, match=r"--max_tokens_per_micro_batch 10 is smaller than the longest "
                                          r"sequence \(11 tokens\).*at least 11"):
        plan_passes([5, 3, 11], 10)
    with pytest.raises(ConfigError, match=r"longest pair \(chosen \+ rejected\) \(12 tokens\)"):
        plan_passes([5, 3, 7, 2], 11, pairs=True)
    batch = {"input_ids": torch.arange(8).view(4, 2), "prompt": list("abcd"), "n": 3}
    part = select_rows(batch, [3, 1])
    assert part["input_ids"].tolist() == [[6, 7], [2, 3]] and part["prompt"] == ["d", "b"] and part["n"] == 3


def test_every_rank_runs_as_many_passes_as_the_rank_that_needs_most(monkeypatch):
    """ZeRO forwards and reductions are collective: a rank that fits its micro-batch in 2 passes
    splits its largest ones until it has the 4 another rank needs (the budget still holds)."""
    import fastrlhf.rlhf.packing as packing
    monkeypatch.setattr(packing, "all_reduce_max", lambda t: torch.tensor([4.0]))
    rows = plan_passes([5, 3, 9, 2, 7, 1], 16)
    assert len(rows) == 4 and sorted(r for p in rows for r in p) == list(range(6))
    assert all(sum([5, 3, 9, 2, 7, 1][r] for r in p) <= 16 for p in rows)
    monkeypatch.setattr(packing, "all_reduce_max", lambda t: torch.tensor([7.0]))
    with pytest.raises(RuntimeError, match="different micro-batch sizes"):
        plan_passes([5, 3, 9, 2, 7, 1], 16)


# --------------------------------------------------------------------------- attention never crosses

def _hf(name):
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(name)
    if name == "gemma2":
        cfg._attn_implementation = "eager"  # sdpa drops gemma2's softcapping
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


# families whose HF forward takes no position_ids (ALiBi from the mask): refused, tested below
NO_PACKED_POSITIONS = ("bloom", "mpt")


@pytest.mark.parametrize("name", [n for n in TINY_CONFIGS if not n.startswith("opt") and n not in NO_PACKED_POSITIONS])
def test_a_packed_forward_never_attends_across_sequences(name, one_thread):
    """Each family's own attention (transformers' sdpa/eager with restarting position_ids): the
    logits of a packed sequence are those of the sequence alone, and do not move when the other
    sequences of the row change; the probe the trainers run agrees."""
    model = _hf(name)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, 90, (n,), generator=g) for n in (6, 1, 9, 4)]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=pos, use_cache=False).logits[0]
        seqs[0] = torch.randint(4, 90, (6,), generator=g)  # change the first sequence only
        changed = model(input_ids=torch.cat(seqs)[None], position_ids=pos, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(changed[6:], packed[6:], atol=1e-6, rtol=0)
    assert (changed[:6] - packed[:6]).abs().max() > 1e-3  # the change itself is seen
    # the trainers' packed path (attention per sequence of the packed row) against the padded batch
    ids, mask = ragged([6, 1, 9, 4], vocab=90)
    with torch.no_grad():
        padded = shifted_logprobs(model, ids, mask, position_ids=position_ids_from_mask(mask))
        ours = shifted_logprobs(model, ids, mask, packed=True)
    real = (mask[:, 1:] * mask[:, :-1]).bool()
    torch.testing.assert_close(ours[real], padded[real], atol=1e-5, rtol=1e-4)
    check_packed_attention(model, "actor", torch.device("cpu"))


@pytest.mark.parametrize("name, window", [("mistral", 3), ("gemma2", 4)])
def test_packed_attention_keeps_sliding_windows_and_softcaps(name, window, one_thread):
    """A window shorter than the sequences (and gemma2's logit softcap) in the per-sequence
    attention of a packed row: the padded batch's numbers, and gradients."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(name)
    cfg.sliding_window = window
    cfg._attn_implementation = "eager" if name == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    (padded, packed), real = padded_and_packed_logprobs(model, *ragged([7, 2, 10], vocab=90, seed=3))
    torch.testing.assert_close(packed[0][real], padded[0][real], atol=1e-5, rtol=1e-4)
    for n, g in padded[1].items():
        torch.testing.assert_close(packed[1][n], g, atol=1e-6, rtol=1e-4, msg=n)


def test_a_family_whose_own_attention_crosses_sequences_is_refused_by_name(one_thread):
    """OPT in transformers 5.x builds its mask without position_ids, so its own attention would let
    packed sequences see each other. The trainers' packed forward attends per sequence, so OPT packs;
    but a layer recomputed in gradient checkpointing's backward runs OPT's own attention, so that
    combination is refused naming the family (a critic over its backbone too). Bloom's forward
    takes no position_ids at all: refused."""
    from transformers import AutoModel, BloomConfig, BloomForCausalLM
    from fastrlhf.models.reward import RewardModel
    model = _hf("opt")
    check_packed_attention(model, "actor", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"--packing: the actor \(opt\) cannot run packed sequences.*with "
                                          r"--gradient_checkpointing.*reaches across packed sequences.*Drop --packing"):
        check_packed_attention(model, "actor", torch.device("cpu"), recompute=True)
    critic = RewardModel(AutoModel.from_config(tiny_config("opt"))).eval()
    with pytest.raises(ConfigError, match=r"the critic \(opt\)"):
        check_packed_attention(critic, "critic", torch.device("cpu"), recompute=True)
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(hidden_size=48, n_layer=2, n_head=4, vocab_size=96)).eval()
    with pytest.raises(ConfigError, match=r"the reference model \(bloom\) cannot run packed sequences"):
        check_packed_attention(bloom, "reference model", torch.device("cpu"))
    for name in NO_PACKED_POSITIONS:  # the engine's tiny configs of the same families
        with pytest.raises(ConfigError, match=rf"the actor \({name}\) cannot run packed sequences"):
            check_packed_attention(_hf(name), "actor", torch.device("cpu"))


def test_gradient_checkpointing_recomputes_a_packed_row_correctly(one_thread):
    """A checkpointed model trains a packed row through its own attention on HF's packed mask (its
    layers recompute in the backward, outside the packed forward): the padded gradients."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    (padded, packed), real = padded_and_packed_logprobs(model, *ragged([7, 2, 10], vocab=90, seed=4))
    torch.testing.assert_close(packed[0][real], padded[0][real], atol=1e-5, rtol=1e-4)
    for n, g in padded[1].items():
        torch.testing.assert_close(packed[1][n], g, atol=1e-6, rtol=1e-4, msg=n)
    check_packed_attention(model, "actor", torch.device("cpu"), recompute=True)


def grouped(vocab: int, seed: int = 0):
    """A rollout-like batch: groups of 3, 1 and 2 answers to left-padded prompts of 4, 6 and 2
    tokens (columns 0-5), answers of 1-5 tokens after them, right-padded -> (ids, mask, 6, the
    tokens a shared packed row saves: (3 - 1) x 4 + (2 - 1) x 2)."""
    g = torch.Generator().manual_seed(seed)
    width, answers = 6, iter((5, 1, 3, 4, 2, 5))
    ids, mask = torch.zeros(6, width + 5, dtype=torch.long), torch.zeros(6, width + 5, dtype=torch.long)
    row = 0
    for p, size in ((4, 3), (6, 1), (2, 2)):
        prompt = torch.randint(4, vocab, (p,), generator=g)
        for _ in range(size):
            n = next(answers)
            ids[row, width - p:width], ids[row, width:width + n] = prompt, torch.randint(4, vocab, (n,), generator=g)
            mask[row, width - p:width + n] = 1
            row += 1
    return ids, mask, width, 10


def tokens_run(model):
    """A list that collects the number of tokens of each forward through `model`'s input embedding."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    return seen


def shared_vs_padded(model, ids, mask, width):
    """[(log-probs, entropies, {name: grad}) padded, packed with shared prompts] of the answer columns."""
    real = (mask[:, width:] * mask[:, width - 1:-1]).bool()
    outs = []
    for kw in ({}, dict(packed=True, shared_prefix=width)):
        model.zero_grad()
        logp, ent = shifted_logprobs(model, ids, mask, position_ids=position_ids_from_mask(mask), start=width - 1,
                                     with_entropy=True, **kw)
        ((logp + 0.1 * ent) * real).sum().backward()
        outs.append((logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}))
    return outs, real


# families whose attention does not go through transformers' attention interface (in 5.24): the
# packed attention cannot stand in for theirs, so their packed rows run every prompt per answer
OWN_ATTENTION = ("stablelm", "stablelm_parallel", "falcon", "falcon_new", "falcon_alibi", "gpt_neo")


@pytest.mark.parametrize("name", [n for n in TINY_CONFIGS if n not in NO_PACKED_POSITIONS])
def test_answers_sharing_their_prompt_compute_what_they_compute_padded(name, one_thread):
    """Every family that packs: a packed row holding each group's prompt once gives each answer the
    padded batch's log-probs, entropies and parameter gradients, and runs 10 tokens fewer (the
    families with their own attention: unshared, the same numbers)."""
    from fastrlhf.models.packed_attention import stands_in
    model = _hf(name)  # eval: no dropout (gradients still flow)
    assert stands_in(model) == (not name in OWN_ATTENTION)
    ids, mask, width, saved = grouped(vocab=90)
    seen = tokens_run(model)
    (padded, shared), real = shared_vs_padded(model, ids, mask, width)
    assert seen[1] == int(mask.sum()) - (0 if name in OWN_ATTENTION else saved)
    torch.testing.assert_close(shared[0][real], padded[0][real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared[1][real], padded[1][real], atol=1e-5, rtol=1e-4)
    assert shared[2].keys() == padded[2].keys()
    for n, g in padded[2].items():  # fp32 sums in another order: an absolute error on the gradient's scale
        torch.testing.assert_close(shared[2][n], g, atol=1e-6 * max(1.0, g.abs().max().item()), rtol=1e-4, msg=n)
    check_packed_attention(model, "actor", torch.device("cpu"), share=True)


def test_a_checkpointed_model_runs_its_prompts_once_per_answer(one_thread):
    """Gradient checkpointing keeps the model's own attention in the backward, which cannot run
    shared prompts: that forward runs unshared (same numbers); a no-grad forward still shares."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, width, saved = grouped(vocab=90, seed=1)
    seen = tokens_run(model)
    (padded, shared), real = shared_vs_padded(model, ids, mask, width)
    assert seen[1] == int(mask.sum())
    for n, g in padded[2].items():
        torch.testing.assert_close(shared[2][n], g, atol=1e-6, rtol=1e-4, msg=n)
    with torch.no_grad():
        shifted_logprobs(model, ids, mask, start=width - 1, packed=True, shared_prefix=width)
    assert seen[-1] == int(mask.sum()) - saved


def test_a_model_that_cannot_share_prompts_is_refused_with_the_fix(monkeypatch, one_thread):
    """A layer the packed attention cannot stand in for meets a shared row: a one-line error naming
    --share_prompts false; and the probe refuses a shared forward that does not compute the padded
    numbers (here a layout broken on purpose) before training."""
    import fastrlhf.models.packed_attention as pa
    model = _hf("mistral")
    ids, mask, width, _ = grouped(vocab=90)
    monkeypatch.setattr(pa, "EXTRA_TERMS", ("sliding_window",))  # mistral's layers pass one
    with pytest.raises(RuntimeError, match=r"shared prompts reached MistralAttention.*--share_prompts false"):
        shifted_logprobs(model, ids, mask, start=width - 1, packed=True, shared_prefix=width)
    monkeypatch.undo()
    grid = PackedRows.grid

    def broken(self):
        src, home, n, longest = grid(self)
        return src, (home.flip(0) if self.shared else home), n, longest
    monkeypatch.setattr(PackedRows, "grid", broken)
    check_packed_attention(model, "actor", torch.device("cpu"))  # unshared packing is unaffected
    with pytest.raises(ConfigError, match=r"--share_prompts: the actor \(mistral\) cannot run a prompt once for "
                                          r"several answers: an answer that reads its prompt from another row does "
                                          r"not compute .*Add --share_prompts false \(packing stays on\)"):
        check_packed_attention(model, "actor", torch.device("cpu"), share=True)


# --------------------------------------------------------------------------- losses and gradients

@pytest.fixture(scope="module")
def models():
    from fastrlhf.models.loading import load_causal_lm
    from fastrlhf.models.reward import RewardModel
    torch.set_num_threads(1)
    policy = load_causal_lm(None, seed=1).train()
    # weights that are not an init's: the log-probs then differ from token to token
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return {"policy": policy, "rm": RewardModel.from_pretrained(None, seed=2).train(),
            "ref": load_causal_lm(None, seed=3).eval()}


def grads_of(model, loss_fn):
    """(the summed loss, {name: grad}) of loss_fn() -> a list of pass losses, each backwarded."""
    model.zero_grad()
    total = 0.0
    for loss in loss_fn():
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-6)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        torch.testing.assert_close(b[1][n], a[1][n], atol=1e-6, rtol=1e-4, msg=n)


def ragged(lengths, left=False, seed=0, vocab=400):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


def in_passes(batch, budget, pairs, weight, loss):
    """A micro-batch's loss as the trainers run it under a token budget: one loss per pass."""
    rows_of = plan_passes(batch["attention_mask"].sum(1).tolist(), budget, pairs)
    assert len(rows_of) > 1
    parts = [select_rows(batch, rows) for rows in rows_of]
    return [loss(part) * (weight(part) / weight(batch)) for part in parts]


def test_sft_rm_and_dpo_losses_and_gradients_packed_equal_padded(models):
    from fastrlhf.rlhf.dpo import dpo_batch_loss
    from fastrlhf.rlhf.reward_trainer import pairs_in, rm_loss
    from fastrlhf.rlhf.sft import labelled_tokens, sft_loss
    ids, mask = ragged([7, 3, 12, 5, 9])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a two-token "prompt"
    sft = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    policy, rm = models["policy"], models["rm"]
    padded = grads_of(policy, lambda: [sft_loss(policy, sft)])
    assert_same(padded, grads_of(policy, lambda: [sft_loss(policy, sft, packed=True)]))
    assert_same(padded, grads_of(policy, lambda: in_passes(sft, 14, False, labelled_tokens,
                                                          lambda b: sft_loss(policy, b, packed=True))))
    # pairs: 3 chosen rows then their rejected twins (a shared prompt of 3 tokens)
    ids, mask = ragged([8, 4, 6, 5, 9, 3], seed=1)
    ids[3:, :3] = ids[:3, :3]
    pairs = {"input_ids": ids, "attention_mask": mask}
    padded = grads_of(rm, lambda: [rm_loss(rm, pairs)])
    assert_same(padded, grads_of(rm, lambda: [rm_loss(rm, pairs, packed=True)]))
    assert_same(padded, grads_of(rm, lambda: in_passes(pairs, 14, True, pairs_in,
                                                      lambda b: rm_loss(rm, b, packed=True))))
    dpo = lambda b, packed: dpo_batch_loss(policy, models["ref"], b, 0.1, 0.1, packed)[0]  # noqa: E731
    padded = grads_of(policy, lambda: [dpo(pairs, False)])
    assert_same(padded, grads_of(policy, lambda: [dpo(pairs, True)]))
    assert_same(padded, grads_of(policy, lambda: in_passes(pairs, 14, True, pairs_in, lambda b: dpo(b, True))))


def rollout_batch(policy, prompt_lens, answer_lens, n_cols=6, seed=0, groups=()):
    """An Experience of answers after left-padded prompts (EOS 2 ends the shorter answers),
    with advantages, old/reference/engine log-probs and critic targets that make every loss
    term, clip and cap act. Each of `groups` (row tuples) answers its first row's prompt."""
    from fastrlhf.rlhf.experience import Experience, answer_logprobs
    g = torch.Generator().manual_seed(seed)
    prompts, pmask = ragged(prompt_lens, left=True, seed=seed)
    for rows in groups:
        prompts[list(rows)], pmask[list(rows)] = prompts[rows[0]].clone(), pmask[rows[0]].clone()
    answers = torch.randint(4, 400, (len(answer_lens), n_cols), generator=g)
    amask = torch.zeros(len(answer_lens), n_cols)
    for i, n in enumerate(answer_lens):
        amask[i, :n] = 1
        if n < n_cols:
            answers[i, n - 1], answers[i, n:] = 2, 0
    seqs = torch.cat([prompts, answers], 1)
    att = torch.cat([pmask, amask.long()], 1)
    with torch.no_grad():
        logp = answer_logprobs(policy, seqs, att, prompts.shape[1])
    noise = lambda s: torch.randn(amask.shape, generator=g) * s  # noqa: E731
    return Experience(sequences=seqs, attention_mask=att, action_mask=amask, old_logprobs=(logp + noise(0.3)) * amask,
                      ref_logprobs=(logp + noise(0.2)) * amask, advantages=noise(1.0) * amask,
                      scores=torch.zeros(len(answer_lens)), prompt_len=prompts.shape[1],
                      old_values=noise(0.5) * amask, returns=noise(1.0) * amask,
                      rollout_logprobs=(logp + noise(0.1)) * amask)


@pytest.mark.parametrize("loss_agg", M.LOSS_AGGREGATIONS)
def test_step3_actor_critic_and_ptx_losses_and_gradients_packed_equal_padded(models, loss_agg):
    """Rows 0-2 and 3-4 answer one prompt each: packed (one row, then passes under a token budget that
    split the groups), with their prompts shared (--share_prompts, the default) and not, the padded
    losses, stats and gradients; the one-row shared forward runs each prompt once."""
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.update_losses import actor_loss, critic_loss, ptx_loss
    base = PPOConfig(algo="grpo", group_size=2, loss_agg=loss_agg, entropy_coef=0.01, dual_clip=3.0, tis_cap=1.5,
                     clip_eps_high=0.28, ptx_coef=0.5, value_clip=0.2)
    policy, critic = models["policy"], models["rm"]
    exp = rollout_batch(policy, [5, 9, 3, 7, 6], [6, 2, 4, 1, 6], groups=[(0, 1, 2), (3, 4)])
    budget = 14  # passes of 1-2 answers each
    rows_of = [torch.tensor(r) for r in plan_passes(exp.attention_mask.sum(1).tolist(), budget)]
    assert len(rows_of) >= 3
    totals = M.BatchTotals.of(exp.action_mask)
    real = int(exp.attention_mask.sum())
    saved = 2 * 5 + 7  # prompt tokens of rows 1, 2 and 4
    cfg = base

    def actor(packed, split):
        if not split:
            return [actor_loss(cfg, policy, exp, 0.1, 6, packed=packed)]
        return [actor_loss(cfg, policy, exp.select(r), 0.1, 6, totals, packed=True) for r in rows_of]

    def loss_and_stats(outs):
        stats = {}
        for _, st, _ in outs:
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v
        return stats

    padded = grads_of(policy, lambda: [o[0] for o in actor(False, False)])
    padded_stats = loss_and_stats(actor(False, False))
    assert padded_stats["policy_clipfrac"] > 0 and padded_stats["tis_weight"] < 1.5  # the clips act
    padded_critic = grads_of(critic, lambda: [critic_loss(base, critic, exp)[0]])
    seen, seen_critic = tokens_run(policy), tokens_run(critic.backbone)
    for share in (None, False):
        cfg = dataclasses.replace(base, packing=True, share_prompts=share)
        for split in (False, True):
            del seen[:]
            assert_same(padded, grads_of(policy, lambda: [o[0] for o in actor(True, split)]))
            if not split:
                assert seen == [real - saved if share is None else real]
            stats = loss_and_stats(actor(True, split))
            assert stats.keys() == padded_stats.keys()
            for k in stats:
                assert stats[k] == pytest.approx(padded_stats[k], rel=1e-5, abs=1e-6), k
        # the critic: one row, then passes
        del seen_critic[:]
        assert_same(padded_critic, grads_of(critic, lambda: [critic_loss(cfg, critic, exp, packed=True)[0]]))
        assert seen_critic == [real - saved if share is None else real]
        assert_same(padded_critic, grads_of(critic, lambda: [critic_loss(cfg, critic, exp.select(r), totals, True)[0]
                                                             for r in rows_of]))
    with pytest.raises(ConfigError, match=r"--share_prompts shares prompts inside packed rows, and --packing is "
                                          r"false: drop one of the two"):
        PPOConfig(algo="grpo", group_size=2, packing=False, share_prompts=True,
                  reward_fn=["fastrlhf.rewards:math_answer_match"]).validate()
    if loss_agg == "token_mean":  # PPO-ptx's SFT loss does not depend on the aggregation
        ids, mask = ragged([7, 3, 12, 5])
        sft = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        n = int((sft["labels"][:, 1:] != -100).sum())
        padded = grads_of(policy, lambda: [ptx_loss(cfg, policy, sft, n)[0]])
        parts = [select_rows(sft, r) for r in plan_passes(mask.sum(1).tolist(), 13)]
        assert_same(padded, grads_of(policy, lambda: [ptx_loss(cfg, policy, p, n, True)[0] for p in parts]))


# --------------------------------------------------------------------------- whole runs

@pytest.mark.parametrize("kind, zero_stage", [("sft", 2), ("rm", 0), ("dpo", 0)])
def test_packed_runs_under_a_token_budget_log_the_padded_losses(tmp_path, kind, zero_stage):
    """Two micro-batches per optimizer step, each run as packed passes of at most 20 tokens (ZeRO-2
    reduces once per micro-batch, at its last pass): every step's loss is the padded run's."""
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import DPOConfig, RMConfig, SFTConfig
    from fastrlhf.rlhf.dpo import train_dpo
    from fastrlhf.rlhf.reward_trainer import train_reward_model
    from fastrlhf.rlhf.sft import train_sft
    from toys import (ToyPairCollator, ToyPairDataset, ToySFTCollator, ToySFTDataset, make_tiny_model_dir,
                      tiny_train_kwargs)
    cls, train, data, collate = {
        "sft": (SFTConfig, train_sft, ToySFTDataset, ToySFTCollator),
        "rm": (RMConfig, train_reward_model, ToyPairDataset, ToyPairCollator),
        "dpo": (DPOConfig, train_dpo, ToyPairDataset, ToyPairCollator)}[kind]
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    tok = load_tokenizer(model_dir)
    losses = {}
    for name, over in (("padded", {}), ("packed", dict(packing=True, max_tokens_per_micro_batch=20))):
        kw = tiny_train_kwargs(model_dir, str(tmp_path / name), max_steps=3, zero_stage=zero_stage,
                               eval_max_batches=1, **over)
        res = train(cls(**kw), tokenizer=tok, datasets=(data(24, 0), data(8, 1)), collate=collate(tok.pad_token_id))
        losses[name] = res["losses"]
    assert sorted(losses["packed"]) == [1, 2, 3]
    for step, loss in losses["padded"].items():
        assert losses["packed"][step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    if kind == "dpo":  # a budget below the longest pair: refused with the numbers, before any model loads
        kw = tiny_train_kwargs(model_dir, str(tmp_path / "small"), packing=True, max_tokens_per_micro_batch=8)
        with pytest.raises(ConfigError, match=r"--max_tokens_per_micro_batch 8 is smaller than the longest pair "
                                              r"\(chosen \+ rejected\) of the training data \(\d+ tokens\)"):
            train(cls(**kw), tokenizer=tok, datasets=(data(24, 0), data(8, 1)), collate=collate(tok.pad_token_id))


def test_a_packed_grpo_step_under_a_token_budget_matches_the_padded_one(tmp_path, monkeypatch, capsys):
    """Two GRPO steps padded (--packing false), packed by default (groups' prompts shared), packed
    under a token budget, and packed with --share_prompts false: the same logged numbers; only the
    shared runs hold a prompt once. With packing unset, a model the probe refuses makes the run
    train padded, saying why; with --packing, it is an error."""
    from conftest import tiny_ppo_setup
    from fastrlhf.rlhf import ppo
    from fastrlhf.rlhf.configs import PPOConfig
    torch.set_num_threads(1)
    _, items = tiny_ppo_setup(tmp_path, 12)
    made, of = [], PackedRows.of.__func__
    monkeypatch.setattr(PackedRows, "of", classmethod(lambda cls, *a, **k: made.append(of(cls, *a, **k)) or made[-1]))
    runs, shared = {}, {}
    for name, over in (("padded", dict(packing=False)), ("default", {}),
                       ("budget", dict(packing=True, max_tokens_per_micro_batch=40)),
                       ("unshared", dict(packing=True, max_tokens_per_micro_batch=40, share_prompts=False))):
        del made[:]
        cfg = PPOConfig(model_name_or_path=str(tmp_path / "sft"), reward_model=str(tmp_path / "rm"),
                        output_dir=str(tmp_path / name), algo="grpo", group_size=2, rollout_batch_size=4,
                        micro_batch_size=4, max_steps=2, max_new_tokens=6, eval_prompts=2, learning_rate=1e-3,
                        seed=7, entropy_coef=0.01, **over)
        t = ppo.PPOTrainer(cfg, prompts=items[:10], eval_prompts=items[10:])
        assert t.cfg.packing is (name != "padded") and cfg.packing == over.get("packing")  # the caller's is kept
        runs[name] = [t.train_step() for _ in range(2)]
        shared[name] = sum(r.shared for r in made)
    with pytest.raises(ConfigError, match=r"--max_tokens_per_micro_batch 12 is smaller than the longest prompt \+ "
                                          r"answer \(\d+ \+ --max_new_tokens 6\) \(\d+ tokens\)"):
        ppo.PPOTrainer(dataclasses.replace(cfg, max_tokens_per_micro_batch=12, output_dir=str(tmp_path / "small")),
                       prompts=items[:10], eval_prompts=items[10:])
    assert shared["padded"] == shared["unshared"] == 0 < min(shared["default"], shared["budget"])
    for name in ("default", "budget", "unshared"):
        for a, b in zip(runs["padded"], runs[name]):
            assert a.keys() == b.keys()
            for k in a:
                if "time" not in k and not k.endswith("_per_s"):
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, k)

    def refuse(models, ctx, **kw):
        raise ConfigError("--packing: the actor (llama) cannot run packed sequences: a test says so")
    monkeypatch.setattr(ppo, "check_models", refuse)
    capsys.readouterr()
    t = ppo.PPOTrainer(dataclasses.replace(cfg, packing=None, max_tokens_per_micro_batch=None, share_prompts=None,
                                           output_dir=str(tmp_path / "refused")), prompts=items[:10],
                       eval_prompts=items[10:])
    assert t.cfg.packing is False
    assert "step 3 trains on padded batches (packing is on by default where every model can run it; --packing " \
           "false silences this): --packing: the actor (llama) cannot run packed sequences: a test says so" \
           in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"the actor \(llama\) cannot run packed sequences: a test says so"):
        ppo.PPOTrainer(dataclasses.replace(cfg, output_dir=str(tmp_path / "refused2")), prompts=items[:10],
                       eval_prompts=items[10:])

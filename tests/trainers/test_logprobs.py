"""rlhf.logprobs: the trainers' one log-prob definition. The fused path (model body + ops.token_logprobs)
equals the full HF forward (logits, log_softmax) in values, entropies and every parameter gradient,
for every tiny family of the hybrid engine that takes it (tied and untied heads, OPT-350m's
project_out, MoE, ALiBi); a model with a final-logit transform (Gemma2's and Gemma3's softcapping,
Granite's logits_scaling) or an lm_head bias (Phi) is scored through the full forward, and says why once."""
import copy

import pytest
import torch

from fastrlhf.rlhf import logprobs as L
from conftest import left_padded_batch


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# every tiny family (conftest.TINY_CONFIGS) whose log-probs take the fused path; the others below
FUSED = ["bloom", "falcon", "falcon_alibi", "falcon_new", "gemma", "gpt2", "gpt_bigcode", "gpt_neo",
         "gpt_neox", "llama", "ministral", "mistral", "mixtral", "mpt", "olmo", "olmo2", "olmo3", "olmoe",
         "opt", "opt_proj", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_tied", "smollm3", "stablelm",
         "stablelm_parallel", "starcoder2"]
# the tiny families scored through the full forward, and the reason they give
FULL_FORWARD = {"gemma2": "final_logit_softcapping", "gemma3_text": "final_logit_softcapping",
                "granite": "logits_scaling=1.7", "phi": "the lm_head has a bias"}


def test_every_tiny_family_is_either_fused_or_refused_with_its_reason():
    from conftest import TINY_CONFIGS
    assert sorted(FUSED + list(FULL_FORWARD)) == sorted(TINY_CONFIGS)


@pytest.mark.parametrize("name", sorted(FULL_FORWARD))
def test_a_family_outside_the_fused_path_says_why(models, name):
    parts, why = L.fused_parts(models[name])
    assert parts is None and FULL_FORWARD[name] in why


@pytest.mark.parametrize("name", FUSED)
def test_fused_equals_full_forward_values_and_gradients(models, name):
    parts, why = L.fused_parts(models[name])
    assert parts is not None, why
    ids, mask = left_padded_batch([7, 12, 4], seed=3)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.clone()
    labels[0, 3:6] = L.IGNORE_INDEX  # ignored rows: 0 and no gradient, on both paths
    results = []
    for fused in (True, False):
        model = copy.deepcopy(models[name]).eval()  # no dropout: both passes see the same network
        logp, ent = L.shifted_logprobs(model, ids, mask, position_ids=pos, labels=labels, start=2,
                                       with_entropy=True, fused=fused)
        assert logp.shape == ent.shape == (3, ids.shape[1] - 3) and logp.dtype == torch.float32
        ((logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum() + ent.sum()).backward()
        results.append((logp.detach(), ent.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (lf, ef, gf), (lu, eu, gu) = results
    assert torch.all(lf[0, :3] == 0) and torch.all(ef[0, :3] == 0) and torch.all(lf[0, 3:] != 0)
    assert _rel(lf, lu) < 1e-5 and _rel(ef, eu) < 1e-5
    total = torch.sqrt(sum(g.norm() ** 2 for g in gu.values() if g is not None))
    for n, g in gu.items():
        if g is None:
            assert gf[n] is None, n
            continue
        assert (gf[n] - g).norm() <= 1e-4 * g.norm() + 1e-6 * total, n


def test_final_logit_softcapping_falls_back_with_a_reason(models, capsys):
    gemma2 = models["gemma2"]
    parts, why = L.fused_parts(gemma2)
    assert parts is None and "final_logit_softcapping" in why
    ids, mask = left_padded_batch([5, 8], seed=4)
    L._logged.discard(why)
    with torch.no_grad():
        got = L.shifted_logprobs(gemma2, ids, mask, start=1)
        L.shifted_logprobs(gemma2, ids, mask, start=1)  # logged once
        logits = gemma2(input_ids=ids, attention_mask=mask).logits[:, 1:-1].float()
    expected = logits.log_softmax(-1).gather(-1, ids[:, 2:, None])[..., 0]
    assert _rel(got, expected) < 1e-6  # HF's forward applies the cap
    assert capsys.readouterr().out.count("final_logit_softcapping") == 1


def test_adapter_on_the_lm_head_and_unknown_families_fall_back(models):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(models["llama"]), LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain nn.Linear" in L.fused_parts(model)[1]
    model = copy.deepcopy(models["llama"])
    model.config.model_type = "mystery"
    assert "not a family known" in L.fused_parts(model)[1]


def test_trainer_losses_take_the_fused_op_and_equal_hf(models, monkeypatch):
    """SFT's loss (= HF's causal-LM loss) and the PPO/DPO log-prob helpers go through ops.token_logprobs."""
    from fastrlhf import ops
    from fastrlhf.rlhf import dpo, experience, sft
    calls = []
    real = ops.token_logprobs
    monkeypatch.setattr(ops, "token_logprobs", lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1])
    model = models["qwen3"]
    ids, mask = left_padded_batch([6, 9], seed=5)
    labels = ids.masked_fill(mask == 0, L.IGNORE_INDEX)
    labels[:, :4] = L.IGNORE_INDEX  # a prompt part
    with torch.no_grad():
        loss = sft.sft_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert calls == [int((labels[:, 1:] != L.IGNORE_INDEX).sum())]  # only the labelled rows
        assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-6)
        logp = experience.answer_logprobs(model, ids, mask, prompt_len=4)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        expected = logits[:, 3:-1].float().log_softmax(-1).gather(-1, ids[:, 4:, None])[..., 0]
        assert _rel(logp, expected) < 1e-6
        both = torch.cat([ids, ids.flip(0)])
        amask = dpo.answer_mask_after_common_prefix(both, torch.cat([mask, mask.flip(0)]))
        dpo.sequence_logprob_sums(model, both, torch.cat([mask, mask.flip(0)]), amask)
    assert len(calls) == 3


def test_position_ids_count_real_tokens_only():
    from fastrlhf.utils.positions import position_ids_from_mask
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(mask.bool()).tolist() == position_ids_from_mask(mask).tolist()

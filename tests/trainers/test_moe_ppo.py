"""One GRPO step on a tiny mixture-of-experts actor (Qwen3-MoE) through the public trainer: the
rollouts come from the hybrid engine's MoE decoder (not the HF fallback), their log-probs agree
with the trainer's forward, and the update reaches the experts and the router."""
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fastrlhf.hybrid_engine import HybridEngine
from fastrlhf.rlhf.configs import PPOConfig
from fastrlhf.rlhf.ppo import PPOTrainer
from conftest import tiny_ppo_setup


@pytest.fixture
def moe_actor(tmp_path):
    torch.set_num_threads(1)
    tok, items = tiny_ppo_setup(tmp_path, 8)
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=48, num_hidden_layers=2, intermediate_size=56,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                               vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    return tmp_path, items


def test_one_grpo_step_on_a_moe_actor(moe_actor, monkeypatch):
    root, items = moe_actor
    families = []
    real = HybridEngine.generate

    def spy(self, *a, **k):
        families.append(None if self.spec is None else self.spec.family)
        return real(self, *a, **k)
    monkeypatch.setattr(HybridEngine, "generate", spy)
    cfg = PPOConfig(model_name_or_path=str(root / "moe"), reward_model=str(root / "rm"),
                    output_dir=str(root / "out"), algo="grpo", group_size=2, rollout_batch_size=2,
                    micro_batch_size=4, max_steps=1, max_new_tokens=6, eval_prompts=0, learning_rate=1e-2,
                    seed=7, save_steps=0)
    trainer = PPOTrainer(cfg, prompts=items[:4], eval_prompts=items[4:5])
    actor = trainer.actor.module
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    metrics = trainer.train_step()
    assert families and set(families) == {"qwen3_moe"}, families
    assert metrics["skipped_updates"] == 0 and math.isfinite(metrics["policy_loss"])
    # the engine's rollout log-probs are those of the trainer's forward (fp32: rounding only)
    assert metrics["logprob_mismatch_abs"] < 1e-4
    moved = {n for n, p in actor.named_parameters() if not torch.equal(p, before[n])}
    assert any("experts.gate_up_proj" in n for n in moved) and any("mlp.gate.weight" in n for n in moved)

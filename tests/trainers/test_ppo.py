"""Step 3 trainer on the bundled tiny Llama (random weights), CPU, fp32.

The models are saved once per module and loaded back by path (the real loading code).
"""
import math
import os
import signal

import pytest
import torch

from fastrlhf.rlhf.experience import answer_logprobs, sequence_scores
from fastrlhf.rlhf.configs import PPOConfig
from fastrlhf.errors import NonFiniteLossError
from fastrlhf.rlhf.ppo import PPOTrainer, train_ppo
from conftest import tiny_ppo_setup

TIMING = {"gen_time", "forward_time", "train_time", "step_time", "tokens_per_s", "gen_tokens_per_s",
          "time_actor_forward", "time_ref_forward", "time_reward_forward", "time_critic_forward",
          "time_actor_train", "time_critic_train"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_models")
    tok, items = tiny_ppo_setup(root, 60)
    return {"root": root, "tok": tok, "train": items[:48], "eval": items[48:]}


def make_cfg(tiny, out, **over):
    kw = dict(model_name_or_path=str(tiny["root"] / "sft"), reward_model=str(tiny["root"] / "rm"),
              output_dir=str(out), rollout_batch_size=4, micro_batch_size=2, max_steps=3,
              max_new_tokens=6, eval_prompts=4, learning_rate=1e-3, critic_learning_rate=1e-3, seed=7)
    kw.update(over)
    return PPOConfig(**kw)


def trainer(tiny, out, models=None, **over):
    return PPOTrainer(make_cfg(tiny, out, **over), prompts=tiny["train"], eval_prompts=tiny["eval"],
                      models=models)


def test_left_padding_does_not_change_answer_logprobs(tiny):
    from fastrlhf.models.loading import load_causal_lm
    model = load_causal_lm(str(tiny["root"] / "sft")).eval()
    seq = torch.tensor([[5, 17, 33, 40, 41, 42]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    mask_padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        a = answer_logprobs(model, seq, torch.ones_like(seq), prompt_len=3)
        b = answer_logprobs(model, padded, mask_padded, prompt_len=6)
        # the same number by hand: log-softmax of the logits one column before each answer token
        logits = model(input_ids=seq).logits
        manual = torch.log_softmax(logits[0, 2:5], -1).gather(-1, seq[0, 3:, None])[:, 0]
    torch.testing.assert_close(a[0], manual)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_reward_is_read_at_the_last_real_token_of_a_doubly_padded_rollout():
    class Echo(torch.nn.Module):  # "value" of a token = its id, so the picked column is visible
        def forward(self, input_ids, attention_mask):
            return input_ids.float()
    seqs = torch.tensor([[0, 0, 11, 12, 7, 2, 0, 0], [0, 13, 14, 15, 5, 6, 8, 9]])
    att = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert sequence_scores(Echo(), seqs, att).tolist() == [2.0, 9.0]


def test_ppo_steps_log_every_metric_and_save_models_and_plot(tiny, tmp_path):
    out = tmp_path / "run"
    res = train_ppo(make_cfg(tiny, out, max_steps=2, ema_decay=0.5),
                    prompts=tiny["train"], eval_prompts=tiny["eval"])
    hist = res["history"]
    assert [h["step"] for h in hist] == [1, 2]
    need = {"reward_mean", "reward_std", "gt_score", "kl", "entropy", "policy_clipfrac", "value_clipfrac",
            "value_error", "approx_kl", "gen_time", "train_time", "tokens_per_s", "kl_coef"}
    for h in hist:
        assert need <= set(h), need - set(h)
        assert all(math.isfinite(v) for v in h.values())
    # learning happened: step 2 saw a policy that moved (ratio != 1 somewhere)
    assert hist[1]["approx_kl"] > 0 or hist[1]["policy_clipfrac"] > 0 or hist[1]["kl"] != 0
    for name in ("actor", "critic", "actor_ema"):
        assert os.path.isfile(out / name / "config.json"), name
    assert os.path.getsize(out / "ppo_curves.png") > 1000
    assert set(res["eval_before"]) == {"reward", "gt_score", "kl_to_ref"}
    assert res["eval_before"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # actor == reference at start
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out / "actor")
    live = res["trainer"].actor.module
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(saved.state_dict()[k], live.state_dict()[k])


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny, tmp_path, algo):
    kw = dict(adaptive_kl=True, target_kl=0.1, kl_horizon=100, normalize_reward=True, ema_decay=0.9, max_steps=3,
              algo=algo, group_size=2 if algo == "grpo" else 1, rollout_batch_size=2 if algo == "grpo" else 4)
    full = trainer(tiny, tmp_path / "full", **kw)
    full.train()
    part = trainer(tiny, tmp_path / "part", save_steps=2, **kw)
    part.total_steps = 2  # as if killed right after the checkpoint of step 2
    part.train()
    del part
    ckpt = tmp_path / "part" / "checkpoint-2"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpt)  # the actor at step 2, a plain HF model
    resumed = trainer(tiny, tmp_path / "part", save_steps=2, **kw)
    assert resumed.maybe_resume() == str(ckpt) and resumed.step == 2
    resumed.train()
    assert [h["step"] for h in resumed.history] == [1, 2, 3]  # the plot's history survives the resume
    for k in full.history[2]:
        if k not in TIMING:
            assert resumed.history[2][k] == full.history[2][k], k
    assert resumed.kl_ctl.value == full.kl_ctl.value != 0.05
    for n, v in full.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[n], v, atol=0, rtol=0)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_algorithms_train_without_a_critic(tiny, tmp_path, algo):
    t = trainer(tiny, tmp_path / algo, algo=algo, group_size=2, rollout_batch_size=2, max_steps=2)
    assert t.critic is None
    m = t.train_step()
    assert "value_loss" not in m and math.isfinite(m["policy_loss"]) and m["skipped_updates"] == 0
    if algo == "grpo":
        assert "kl_loss" in m


def test_nan_reward_skips_steps_then_stops_with_a_message(tiny, tmp_path):
    from fastrlhf.models.reward import RewardModel

    class NaNReward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids, attention_mask) * float("nan")

    rm = NaNReward(RewardModel.from_pretrained(str(tiny["root"] / "rm")))
    t = trainer(tiny, tmp_path / "nan", models={"reward": rm}, max_nonfinite_steps=2, max_steps=5)
    before = {n: p.detach().clone() for n, p in t.actor.module.named_parameters()}
    m = t.train_step()
    assert m["skipped_updates"] == t.updates_per_step and m["nonfinite_steps"] == 1
    for n, p in t.actor.module.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
    with pytest.raises(NonFiniteLossError, match="2 consecutive PPO steps"):
        t.train_step()


def test_sigterm_saves_a_checkpoint_then_exits(tiny, tmp_path):
    t = trainer(tiny, tmp_path / "sig", max_steps=5)
    real_step = t.train_step

    def step_then_signal():
        m = real_step()
        if t.step == 1:  # the base loop counts the step after train_step returns: this is step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return m
    t.train_step = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        t.train()
    assert e.value.code == 128 + signal.SIGTERM
    assert os.path.isfile(tmp_path / "sig" / "checkpoint-2" / "trainer_state.json")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler from before training is back
    resumed = trainer(tiny, tmp_path / "sig", max_steps=5)
    resumed.maybe_resume()
    assert resumed.step == 2 and resumed.sampler.state_dict() == t.sampler.state_dict()


def test_tokenizer_mismatch_and_overlong_are_clear_errors_before_training(tiny, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    other = tmp_path / "other_rm"
    import shutil
    shutil.copytree(tiny["root"] / "rm", other)
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    for f in os.listdir(other):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(other / f)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(other)
    with pytest.raises(ValueError, match="different tokenizers"):
        trainer(tiny, tmp_path / "mm", reward_model=str(other))
    # or, by option, answers are decoded and re-encoded with the reward model's tokenizer
    t = trainer(tiny, tmp_path / "retok", reward_model=str(other), reward_tokenizer="retokenize", max_steps=1)
    m = t.train_step()
    assert math.isfinite(m["reward_mean"]) and m["skipped_updates"] == 0
    with pytest.raises(ValueError, match="exceeds the actor's 256 positions"):
        trainer(tiny, tmp_path / "long", max_new_tokens=250)
    with pytest.raises(ValueError, match="group_size"):
        make_cfg(tiny, tmp_path, algo="grpo").validate()


def test_ppo_ptx_mixes_the_sft_loss_into_the_actor_update(tiny, tmp_path):
    tok = tiny["tok"]
    sft = []
    for it in tiny["train"][:8]:
        answer = tok(" the lake is joyful", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = list(it["prompt_input_ids"]) + answer
        sft.append({"input_ids": torch.tensor(ids),
                    "labels": torch.tensor([-100] * len(it["prompt_input_ids"]) + answer)})
    cfg = make_cfg(tiny, tmp_path / "ptx", ptx_coef=0.5)
    t = PPOTrainer(cfg, prompts=tiny["train"], eval_prompts=tiny["eval"], ptx_data=sft)
    losses = [t.train_step()["ptx_loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # lr 1e-3 on 8 repeated SFT rows: the LM loss must fall


def test_lora_actor_trains_only_lora_and_is_saved_merged(tiny, tmp_path):
    t = trainer(tiny, tmp_path / "lora", lora_rank=4, lora_alpha=8, only_optimize_lora=True,
                lora_target_modules=["q_proj", "v_proj"], max_steps=1)
    base = {n: p.detach().clone() for n, p in t.actor.module.named_parameters()}
    m = t.train_step()
    assert m["skipped_updates"] == 0
    changed = {n for n, p in t.actor.module.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(".lora_" in n for n in changed)
    paths = t.save_final()
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(paths["actor"])
    assert not any("lora" in k for k in saved.state_dict())
    ids = tiny["train"][0]["prompt_input_ids"]
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=x).logits, t.actor.module(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)


def test_shared_options_are_honoured_by_step3(tiny, tmp_path):
    """global_batch_size (accumulation), warmup_ratio, log_steps, eval_steps, eval_batch_size and
    eval_max_batches: options every trainer takes, each with a visible effect on PPO."""
    import json
    t = trainer(tiny, tmp_path / "opts", max_steps=4, rollout_batch_size=4, micro_batch_size=2, global_batch_size=4,
                warmup_ratio=0.75, log_steps=2, eval_steps=3, eval_batch_size=3, eval_max_batches=1, eval_prompts=8)
    assert t.ctx.accumulation == 2
    t.train_step()
    assert t.actor.engine.global_steps == t.updates_per_step // 2  # two mini-batches per optimizer step
    # warmup over 3 of the 4 x 1 optimizer steps: after the first, the rate is 2/3 of the peak
    assert t.actor.get_lr()[0] == pytest.approx(t.cfg.learning_rate * 2 / 3)
    prompts_scored = []
    real_rollout = t.rollouts.rollout
    t.rollouts.rollout = lambda batch, gen=None: prompts_scored.append(len(batch["prompt"])) or real_rollout(batch, gen)
    t.evaluate()
    assert prompts_scored == [3]  # one eval batch of eval_batch_size prompts
    t.rollouts.rollout = real_rollout
    t.train()
    rows = [json.loads(line) for line in open(tmp_path / "opts" / "tensorboard" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/reward_mean" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval/reward" in r] == [3]

"""Tensor-parallel generation (EngineConfig(tp_size=N), --inference_tp_size N).

All multi-rank checks run in ONE launch of 4 CPU processes (torchrun, gloo), i.e. 2 tensor-parallel
groups of 2 ranks, each rank with its own prompts (different batch sizes and prompt lengths). The
1-process reference of a rank's prompts is the engine with tp_size=1 on that rank alone (no
collectives: what one process computes), run in the workers so that the 2 cores share that work.
- every supported family (OLMo-2/3 are refused), no ZeRO: greedy tokens identical to 1 process
  and log-probs within 1e-5 (fp32); the issue's five (Llama with GQA, Qwen2 with
  biases, OPT, GPT-NeoX with partial rotary, Mistral with 1 KV head < tp_size) with both lm_head
  modes; sampling with several EOS ids (rows stop at different steps): the same sequences, each rank
  cut where it alone would stop, also with num_return_sequences=3; LoRA fused per shard with the base weights bit-identical after;
- ZeRO-3 partitioned over the 4 ranks (zero3_gather "all" and "layer"): the same tokens, each rank
  gathering only its slices (about half the weight bytes), partitions and optimizer untouched;
- one PPO step under ZeRO-3 with inference_tp_size=2 gives the metrics of inference_tp_size=1.
The single-process tests check the bad-input errors.
"""
import json
import os
import sys

import pytest
import torch

from conftest import assert_same_generation, build_tiny, left_padded_batch, tiny_ppo_setup, torchrun

FIVE = ["llama", "qwen2", "opt", "gpt_neox", "mistral"]  # mistral: 1 KV head, replicated on both ranks
# beyond conftest's tiny models: Falcon's grouped [Hkv, g + 2, D] qkv with 1 KV head (replicated
# on both ranks, each taking half of the group's q heads)
EXTRA = {"falcon_new_mqa": ("falcon", dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                           num_kv_heads=1, new_decoder_architecture=True, bias=True,
                                           vocab_size=96, max_position_embeddings=128))}
FAMILIES = FIVE + ["opt_proj", "falcon", "falcon_new", "gpt2", "phi3", "gemma", "gemma2", "starcoder2",
                   "stablelm", "stablelm_parallel", "qwen3", "qwen3_tied",
                   # ALiBi (each rank its heads' slopes), windows, per-layer rotary tables, multipliers
                   "bloom", "mpt", "falcon_alibi", "gemma3_text", "ministral", "olmo", "smollm3", "phi",
                   "gpt_neo", "gpt_bigcode", "granite"] + list(EXTRA)
WORLD, TP, NEW = 4, 2, 6
LENGTHS = [[5, 9, 3], [7, 2], [4, 6, 8, 3], [10]]  # each rank's prompts
EOS = [10, 20, 30, 40, 50, 60, 70, 80]
SAMPLED = dict(do_sample=True, temperature=1.5, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0,
               return_logprobs=True)
GREEDY = dict(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, return_logprobs=True)


def _prompts(rank):
    return left_padded_batch(LENGTHS[rank], seed=100 + rank)


def _lora(model):
    """fastrlhf LoRA on every projection, B made non-zero (deterministically)."""
    from fastrlhf.models.lora import apply_lora, lora_modules
    torch.manual_seed(5)
    apply_lora(model, r=4, alpha=8.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    for mod in lora_modules(model):
        mod.lora_b.data.copy_(torch.randn(mod.lora_b.shape, generator=g) * 0.3)
    return model


def _load(path, family):
    from transformers import AutoModelForCausalLM
    kw = dict(attn_implementation="eager") if family == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _out(o):
    return {"seq": o.sequences.tolist(), "lp": o.logprobs.tolist()}


# ------------------------------------------------------------------------------------------- worker

def _worker(root: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ids, mask = _prompts(rank)
    res = {}

    def tp_engine(model, **kw):
        return HybridEngine(model, None, EngineConfig(backend="torch", tp_size=TP, **kw))

    for fam in FAMILIES:  # no ZeRO: shards are views / one-time slices of the full weights
        model = _load(os.path.join(root, fam), fam)
        one = HybridEngine(model, None, EngineConfig(backend="torch"))
        res[f"{fam}/1"] = _out(one.generate(ids, mask, **GREEDY))
        for head in ("vocab_parallel", "replicated") if fam in FIVE else ("vocab_parallel",):
            res[f"{fam}/{head}"] = _out(tp_engine(model, tp_lm_head=head).generate(ids, mask, **GREEDY))
        if fam == "llama":
            res["sampled/1"] = _out(one.generate(ids, mask, generator=1000 + rank, **SAMPLED))
            res["sampled"] = _out(tp_engine(model).generate(ids, mask, generator=1000 + rank, **SAMPLED))
            # 3 answers per prompt, the prompt computed once: each answer's seed, hence its tokens,
            # the same in both groups' layouts
            groups = dict(SAMPLED, num_return_sequences=3)
            res["groups/1"] = _out(one.generate(ids, mask, generator=2000 + rank, **groups))
            res["groups"] = _out(tp_engine(model).generate(ids, mask, generator=2000 + rank, **groups))
            _lora(model)
            base = {n: p.detach().clone() for n, p in model.named_parameters()}
            res["lora/1"] = _out(HybridEngine(model, None, EngineConfig(backend="torch")).generate(ids, mask, **GREEDY))
            res["lora"] = _out(tp_engine(model).generate(ids, mask, **GREEDY))
            res["lora_base_unchanged"] = all(torch.equal(p, base[n]) for n, p in model.named_parameters())

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9}
    for fam in ("llama", "gpt_neox"):  # ZeRO-3 over all 4 ranks, tp groups of 2
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive while loading: partitions at load)
        model = _load(os.path.join(root, fam), fam)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ds_engine, optim, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
        params = [p for p in ds_engine.module.parameters() if p.ds_numel > 0]
        parts_before = [p.ds_tensor.clone() for p in params]
        fp32_before = [t.clone() for t in optim.fp32_partitioned_groups_flat]
        for gather in ("all", "layer") if fam == "llama" else ("all",):
            engine = tp_engine(ds_engine, zero3_gather=gather)
            with engine.inference():
                out = engine.generate(ids, mask, **GREEDY)
                res[f"zero3/{fam}/{gather}"] = {**_out(out), **engine.memory_footprint(),
                                                "full_bytes": sum(p.ds_numel * 4 for p in params)}
            res[f"zero3/{fam}/{gather}"]["released"] = all(p.numel() == 0 for p in params)
        res[f"zero3/{fam}/untouched"] = (
            all(torch.equal(a, p.ds_tensor) for a, p in zip(parts_before, params))
            and all(torch.equal(a, b) for a, b in zip(fp32_before, optim.fp32_partitioned_groups_flat)))
        del keep

    res["ppo"] = {tp: _ppo_step(root, tp) for tp in (1, TP)}
    with open(os.path.join(root, f"result{rank}.json"), "w") as f:
        json.dump(res, f)


def _ppo_step(root: str, tp: int):
    """The metrics of one PPO step (actor ZeRO-3) with inference_tp_size=tp."""
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import PPOTrainer
    items = json.load(open(os.path.join(root, "ppo_prompts.json")))
    cfg = PPOConfig(model_name_or_path=os.path.join(root, "sft"), reward_model=os.path.join(root, "rm"),
                    output_dir=os.path.join(root, f"ppo_tp{tp}"), zero_stage=3, rollout_batch_size=2,
                    micro_batch_size=2, max_steps=1, max_new_tokens=6, eval_prompts=0, learning_rate=1e-3,
                    inference_tp_size=tp, seed=3)
    trainer = PPOTrainer(cfg, prompts=items, eval_prompts=items[:1])
    return {k: v for k, v in trainer.train_step().items() if "time" not in k and not k.endswith("_per_s")}


# ------------------------------------------------------------------------------------------- tests

def _ppo_data(root):
    _, items = tiny_ppo_setup(root, 16)
    (root / "ppo_prompts.json").write_text(json.dumps(items))


def _build_extra(name, path):
    from transformers import AutoConfig, AutoModelForCausalLM
    family, kw = EXTRA[name]
    cfg = AutoConfig.for_model(family, initializer_range=0.25, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))


def test_tensor_parallel_generation_matches_one_process(tmp_path):
    for fam in FAMILIES:
        (_build_extra if fam in EXTRA else build_tiny)(fam, tmp_path / fam)
    _ppo_data(tmp_path)

    proc = torchrun(__file__, WORLD, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    same = assert_same_generation

    # the sampled case must exercise early stopping: in some group, one rank's rows all stop before
    # the other's, so the union runs longer than that rank alone would
    lens = [len(res["sampled/1"]["seq"][0]) - max(LENGTHS[r]) for r, res in enumerate(results)]
    assert any(len(set(lens[g:g + TP])) > 1 for g in range(0, WORLD, TP)), lens
    for r, res in enumerate(results):
        for fam in FAMILIES:
            for head in ("vocab_parallel", "replicated") if fam in FIVE else ("vocab_parallel",):
                # gemma's sqrt(hidden) embedding scale makes its logits ~5x larger than the others'
                same(res[f"{fam}/{head}"], res[f"{fam}/1"], f"{fam} {head} rank {r}",
                     lp_tol=1e-5 if fam in FIVE else 5e-5)
        same(res["sampled"], res["sampled/1"], f"sampled rank {r}")
        same(res["groups"], res["groups/1"], f"num_return_sequences rank {r}")
        assert len(res["groups"]["seq"]) == 3 * len(LENGTHS[r])
        same(res["lora"], res["lora/1"], f"lora rank {r}")
        assert res["lora/1"]["seq"] != res["llama/1"]["seq"]  # the fused LoRA update mattered
        assert res["lora_base_unchanged"]
        for key in ("zero3/llama/all", "zero3/llama/layer", "zero3/gpt_neox/all"):
            z = res[key]
            same(z, res[key.split("/")[1] + "/1"], f"{key} rank {r}")
            assert z["released"], key
            if key.endswith("all"):  # only this rank's slices were gathered: about half the model
                assert z["gathered"] == z["weights"] < 0.6 * z["full_bytes"], (key, z)
        assert res["zero3/llama/untouched"] and res["zero3/gpt_neox/untouched"]
    one, two = results[0]["ppo"]["1"], results[0]["ppo"][str(TP)]
    assert one.keys() == two.keys() and one["skipped_updates"] == 0
    assert {"reward_mean", "kl", "answer_len"} <= one.keys()
    for k in one:
        # the engine-vs-trainer log-prob mismatch measures the engine's rounding (~1e-6), which
        # the split reductions of TP change at that scale; every other metric is the same
        tol = dict(abs=1e-5) if k.startswith("logprob_mismatch") else dict(rel=1e-6, abs=1e-7)
        assert two[k] == pytest.approx(one[k], **tol), (k, one[k], two[k])


# ------------------------------------------------------------------------------------------- bad input

def test_tp_size_errors_name_the_numbers_and_valid_choices():
    from transformers import AutoConfig
    from fastrlhf.hybrid_engine import EngineConfig
    from fastrlhf.hybrid_engine.tensor_parallel import check_tp_size, valid_tp_sizes
    llama = AutoConfig.for_model("llama", hidden_size=96, num_attention_heads=12, num_key_value_heads=4,
                                 num_hidden_layers=1, vocab_size=64)
    check_tp_size(llama, 4, 8)
    check_tp_size(llama, 2, 8)
    with pytest.raises(ValueError, match=r"tp_size=3 does not divide the world size 8.*\[1, 2, 4, 8\]"):
        check_tp_size(llama, 3, 8)
    with pytest.raises(ValueError, match=r"tp_size=8 does not divide the model's 12 attention heads.*\[1, 2, 4\]"):
        check_tp_size(llama, 8, 8)
    with pytest.raises(ValueError, match=r"tp_size=6 cannot share the model's 4 KV heads.*\[1, 2, 4, 12\]"):
        check_tp_size(llama, 6, 12)  # 12 heads / 6 = 2 per rank, but they straddle KV heads
    assert valid_tp_sizes(12, 4) == [1, 2, 4, 12] and valid_tp_sizes(4, 1) == [1, 2, 4]
    with pytest.raises(ValueError, match="tp_size must be an integer >= 1"):
        EngineConfig(tp_size=0).validate()
    with pytest.raises(ValueError, match="fallback"):
        EngineConfig(tp_size=2, fallback="hf").validate()
    with pytest.raises(ValueError, match="tp_lm_head"):
        EngineConfig(tp_size=2, tp_lm_head="gathered").validate()


def test_inference_tp_size_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    from fastrlhf.errors import ConfigError
    from fastrlhf.rlhf import ppo_models
    from fastrlhf.rlhf import configs
    from fastrlhf.rlhf.configs import PPOConfig
    monkeypatch.setattr(configs, "get_world_size", lambda: 4)  # as under a 4-process launcher
    with pytest.raises(ConfigError, match=r"--inference_tp_size 3 does not divide the 4 processes.*\[1, 2, 4\]"):
        PPOConfig(reward_model="rm", inference_tp_size=3).validate()
    with pytest.raises(ConfigError, match="generation_fallback"):
        PPOConfig(reward_model="rm", inference_tp_size=2, generation_fallback="hf").validate()
    # head counts from the actor's config: the tiny gemma has 4 heads, 1 KV head -> 4 is fine, 3 is not
    from conftest import tiny_config
    tiny_config("gemma").save_pretrained(tmp_path / "actor")
    cfg = PPOConfig(model_name_or_path=str(tmp_path / "actor"), reward_model="rm", inference_tp_size=4)
    ppo_models.check_inference_tp(cfg, {}, 4)
    cfg.inference_tp_size = 8
    with pytest.raises(ConfigError, match=r"tp_size=8 does not divide the model's 4 attention heads"):
        ppo_models.check_inference_tp(cfg, {}, 8)
    loaded = []
    monkeypatch.setattr(ppo_models, "load_causal_lm", lambda *a, **k: loaded.append(a))
    ctx = type("Ctx", (), {"world_size": 8, "ds_config": {}})()
    with pytest.raises(ConfigError):
        ppo_models.build_ppo_models(cfg, ctx, None, 1)
    assert not loaded  # refused before any weights were read


def test_tp_engine_needs_a_process_group_of_a_fitting_size(tmp_path):
    import torch.distributed as dist
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    model = build_tiny("llama", tmp_path / "m")
    # other tests of this pytest process may have created a 1-process group
    why = ("does not divide the world size 1" if dist.is_initialized()
           else "needs torch.distributed initialized")
    with pytest.raises(ValueError, match=why):
        HybridEngine(model, None, EngineConfig(tp_size=2))


if __name__ == "__main__":
    _worker(sys.argv[1])

"""Mixtures of experts on 2 processes (torchrun, gloo, CPU): tensor parallelism with each expert's
intermediate dimension split over the group, and ZeRO-3 gathering (all / per layer, and the
tensor-parallel slice reads of 3-D expert parameters), against 1 process without either.

One launch of 2 ranks (one tensor-parallel group), each rank with its own prompts:
- no ZeRO: Qwen2-MoE (shared expert behind its sigmoid gate, a dense layer among MoE layers) with
  tp_size=2 gives the tokens of tp_size=1 and log-probs within 1e-5; so does Qwen3-MoE with PEFT
  LoRA on the experts (target_parameters) and attention, with the base parameters bit-identical after;
- ZeRO-3 over both ranks, Qwen2-MoE: zero3_gather "all" and "layer", tp_size 1 and 2, the tokens of
  the unpartitioned model; parameters released after, partitions and optimizer untouched.
"""
import json
import os
import sys

import torch

from conftest import assert_same_generation, build_tiny, left_padded_batch, peft_lora_on_experts, torchrun

WORLD = 2
LENGTHS = [[5, 9, 3], [7, 2]]
GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, return_logprobs=True)
FAMILIES = ["qwen2_moe", "qwen3_moe"]


def _load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _out(o):
    return {"seq": o.sequences.tolist(), "lp": o.logprobs.tolist()}


def _worker(root: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ids, mask = left_padded_batch(LENGTHS[rank], seed=100 + rank)
    res = {}
    for fam in FAMILIES:
        model = _load(os.path.join(root, fam))
        if fam == "qwen3_moe":
            model = peft_lora_on_experts(model, ["q_proj", "v_proj"])
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        for tp in (1, 2):
            engine = HybridEngine(model, None, EngineConfig(backend="torch", tp_size=tp))
            res[f"{fam}/{tp}"] = _out(engine.generate(ids, mask, **GREEDY))
        res[f"{fam}/untouched"] = all(torch.equal(p, base[n]) for n, p in model.named_parameters())

    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive while loading: partitions at load)
    model = _load(os.path.join(root, "qwen2_moe"))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_engine, optim, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
    params = [p for p in ds_engine.module.parameters() if p.ds_numel > 0]
    res["partitioned"] = all(p.numel() == 0 for p in params)
    parts_before = [p.ds_tensor.clone() for p in params]
    fp32_before = [t.clone() for t in optim.fp32_partitioned_groups_flat]
    for tp in (1, 2):
        for gather in ("all", "layer"):
            engine = HybridEngine(ds_engine, None, EngineConfig(backend="torch", tp_size=tp, zero3_gather=gather))
            res[f"zero3/{tp}/{gather}"] = _out(engine.generate(ids, mask, **GREEDY))
            res[f"zero3/{tp}/{gather}"]["released"] = all(p.numel() == 0 for p in params)
    res["zero3/untouched"] = (all(torch.equal(a, p.ds_tensor) for a, p in zip(parts_before, params))
                              and all(torch.equal(a, b) for a, b in zip(fp32_before, optim.fp32_partitioned_groups_flat)))
    with open(os.path.join(root, f"result{rank}.json"), "w") as f:
        json.dump(res, f)


def test_moe_tensor_parallel_and_zero3_match_one_process(tmp_path):
    for fam in FAMILIES:
        build_tiny(fam, tmp_path / fam)
    proc = torchrun(__file__, WORLD, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)]
    same = assert_same_generation
    for r, res in enumerate(results):
        for fam in FAMILIES:
            same(res[f"{fam}/2"], res[f"{fam}/1"], f"{fam} tp=2 rank {r}")
            assert res[f"{fam}/untouched"], fam
        assert res["partitioned"]
        for tp in (1, 2):
            for gather in ("all", "layer"):
                key = f"zero3/{tp}/{gather}"
                same(res[key], res["qwen2_moe/1"], f"{key} rank {r}")
                assert res[key]["released"], key
        assert res["zero3/untouched"]


if __name__ == "__main__":
    _worker(sys.argv[1])

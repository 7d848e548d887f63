"""ZeRO-3: a 2-process (gloo, CPU) DeepSpeed run generates the same tokens as 1 process without ZeRO.

The test launches this file under `torchrun --nproc_per_node 2`; each rank loads the model
partitioned (HfDeepSpeedConfig + from_pretrained), wraps it with deepspeed.initialize and runs
HybridEngine on the DeepSpeed engine with zero3_gather="all" and "layer". Rank 0 reports the
tokens, whether parameters were re-partitioned afterwards and whether the optimizer's fp32
partitions were untouched; then one training step checks training still works.
"""
import json
import os
import subprocess
import sys

import torch

from fastrlhf.models.loading import hf_dtype_kwargs
from conftest import build_tiny, left_padded_batch

NEW_TOKENS = 12


def _worker(model_dir: str, out_path: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while loading)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **hf_dtype_kwargs(torch.float32))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_engine, optim, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
    params = list(ds_engine.module.parameters())
    partitioned_before = all(p.numel() == 0 for p in params if p.ds_numel > 0)
    fp32_before = [t.detach().clone() for t in optim.fp32_partitioned_groups_flat]

    ids, mask = left_padded_batch([5, 9, 3, 7], seed=11)
    result = {"partitioned_before": partitioned_before, "tokens": {}, "released": {}}
    for mode in ("all", "layer"):
        engine = HybridEngine(ds_engine, None, EngineConfig(zero3_gather=mode, backend="torch"))
        out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)
        result["tokens"][mode] = out.sequences.tolist()
        result["released"][mode] = all(p.numel() == 0 for p in params if p.ds_numel > 0)
    # two answers per prompt (prompt computed once, its blocks shared) on the gathered weights
    engine = HybridEngine(ds_engine, None, EngineConfig(zero3_gather="layer", backend="torch"))
    out = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0, num_return_sequences=2)
    result["groups"] = out.sequences.tolist()
    result["released"]["groups"] = all(p.numel() == 0 for p in params if p.ds_numel > 0)
    result["optimizer_untouched"] = all(torch.equal(a, b) for a, b in
                                        zip(fp32_before, optim.fp32_partitioned_groups_flat))
    # training still works on the same engine after generation
    seq = torch.tensor(result["tokens"]["all"])[:2]
    loss = ds_engine(input_ids=seq, labels=seq).loss
    ds_engine.backward(loss)
    ds_engine.step()
    result["train_loss"] = float(loss)
    result["optimizer_stepped"] = not all(torch.equal(a, b) for a, b in
                                          zip(fp32_before, optim.fp32_partitioned_groups_flat))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def test_zero3_two_process_generation_matches_single_process(tmp_path):
    model = build_tiny("llama", tmp_path / "model")
    ids, mask = left_padded_batch([5, 9, 3, 7], seed=11)
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    ref = HybridEngine(model, None, EngineConfig(backend="torch")).generate(
        ids, mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=0).sequences
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(ref, hf)

    out_path = tmp_path / "zero3.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), __file__, str(tmp_path / "model"),
           str(out_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out_path.read_text())
    assert result["partitioned_before"], "the model was not ZeRO-3 partitioned"
    for mode in ("all", "layer"):
        assert torch.equal(torch.tensor(result["tokens"][mode]), ref), f"zero3_gather={mode!r}"
        assert result["released"][mode], f"parameters still gathered after generate ({mode})"
    groups = torch.tensor(result["groups"])  # greedy: each of a prompt's two rows is HF's answer
    assert torch.equal(groups[::2], ref) and torch.equal(groups[1::2], ref)
    assert result["released"]["groups"]
    assert result["optimizer_untouched"]
    assert result["optimizer_stepped"] and result["train_loss"] == result["train_loss"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

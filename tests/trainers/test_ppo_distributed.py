"""Step 3 across 2 CPU processes (torchrun, gloo) with a ZeRO-3 actor and ZeRO-3 frozen models."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from fastrlhf.tasks.default_task import default_data_path
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import train_ppo
    from fastrlhf.utils import get_rank, get_world_size
    root, out = sys.argv[1], sys.argv[2]
    tok = load_tokenizer(None, padding_side="left")
    rows = [json.loads(l) for l in open(default_data_path())][:40]
    items = [{"prompt": r["prompt"], "prompt_input_ids": tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True,
        return_dict=False)} for r in rows]
    cfg = PPOConfig(model_name_or_path=root + "/sft", reward_model=root + "/rm", output_dir=out,
                    zero_stage=3, frozen_zero_stage=3, critic_zero_stage=2, rollout_batch_size=2,
                    micro_batch_size=2, max_steps=2, max_new_tokens=5, eval_prompts=4, ema_decay=0.5,
                    learning_rate=1e-3)
    res = train_ppo(cfg, prompts=items[:32], eval_prompts=items[32:])
    assert get_world_size() == 2
    if get_rank() == 0:
        json.dump({"history": res["history"], "paths": res["paths"]}, open(out + "/result.json", "w"))
""")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_zero3_ppo_completes(tmp_path):
    import torch
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.models.reward import RewardModel
    tok = load_tokenizer(None)
    load_causal_lm(None, seed=1).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    RewardModel.from_pretrained(None, seed=2).save_pretrained(str(tmp_path / "rm"))
    tok.save_pretrained(tmp_path / "rm")
    script = tmp_path / "run_ppo.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    env = dict(os.environ, FASTRLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script), str(tmp_path), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((out / "result.json").read_text())
    assert [h["step"] for h in res["history"]] == [1, 2]
    assert all(h["skipped_updates"] == 0 for h in res["history"])
    from transformers import AutoModelForCausalLM
    actor = AutoModelForCausalLM.from_pretrained(res["paths"]["actor"])  # gathered from the 2 partitions
    assert all(torch.isfinite(p).all() for p in actor.parameters())
    assert "held-out prompts" in proc.stdout + proc.stderr

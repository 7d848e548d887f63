"""Multi-turn GRPO across 2 CPU processes (torchrun, gloo): a ZeRO-3 actor with the engine's
sessions on each process, and with --inference_tp_size 2 (the turn-by-turn path): both train on
multi-turn trajectories whose engine log-probs match the ZeRO-3 trainer's, turn by turn."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(root: str, out: str) -> None:
    sys.path.insert(0, HERE)
    import torch
    torch.set_num_threads(1)
    from fastrlhf.data import DataSpec, build_datasets
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.rlhf.configs import PPOConfig
    from fastrlhf.rlhf.ppo import train_ppo
    from fastrlhf.utils import get_rank, get_world_size
    assert get_world_size() == 2
    tok = load_tokenizer(root + "/sft", padding_side="left")
    spec = DataSpec(paths=[root + "/guess.jsonl"], split_ratios="0,0,1", eval_fraction=0.2)
    train, evals = build_datasets(spec, tok, 3)
    results = {}
    for name, tp in (("zero3", 1), ("zero3_tp2", 2)):
        cfg = PPOConfig(model_name_or_path=root + "/sft", output_dir=f"{out}/{name}", zero_stage=3, algo="grpo",
                        group_size=2, rollout_batch_size=2, micro_batch_size=4, max_steps=2, max_new_tokens=4,
                        max_turns=3, eval_prompts=2, learning_rate=1e-3, kl_coef=0.0, seed=3, resume="no",
                        inference_tp_size=tp, env=f"{HERE}/envs.py:HigherLower",
                        reward_fn=[f"{HERE}/envs.py:length_reward"], data=spec)
        res = train_ppo(cfg, prompts=[train[i] for i in range(len(train))],
                        eval_prompts=[evals[i] for i in range(len(evals))])
        results[name] = res["history"]
    if get_rank() == 0:
        json.dump(results, open(out + "/result.json", "w"))


@pytest.mark.slow
def test_multi_turn_grpo_on_two_processes_with_zero3_and_tensor_parallel_generation(tmp_path):
    from agent_models import tiny_llama, word_tokenizer
    from conftest import torchrun
    tok = word_tokenizer()
    tiny_llama(tok, seed=4).save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    rows = open(os.path.join(HERE, "..", "..", "examples", "guess_number", "prompts.jsonl")).readlines()[:20]
    (tmp_path / "guess.jsonl").write_text("".join(rows))
    proc = torchrun(os.path.abspath(__file__), 2, tmp_path, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    for name, history in res.items():
        assert [h["step"] for h in history] == [1, 2], name
        for h in history:
            assert h["skipped_updates"] == 0 and h["turns_mean"] == 3.0, name   # HigherLower: done at turn 3
            for turn in (1, 2, 3):
                assert h[f"logprob_mismatch_abs_turn{turn}"] < 1e-3, (name, turn, h)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

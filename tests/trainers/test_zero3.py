"""A 2-process ZeRO-3 SFT run on the CPU (gloo, torchrun) must match the 1-process run."""
import json
import os
import subprocess
import sys

import pytest

from toys import make_tiny_model_dir

TOYS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "toys.py")  # a toy SFT run


def _run(argv, out, env_extra=None, timeout=420):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", FASTRLHF_NO_PROGRESS="1", **(env_extra or {}))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


@pytest.mark.slow
def test_two_process_zero3_sft_matches_one_process(tmp_path):
    model_dir = make_tiny_model_dir(str(tmp_path / "model"))
    common = ["--model_dir", model_dir, "--zero_stage", "3", "--micro_batch_size", "4", "--global_batch_size", "8",
              "--max_steps", "6"]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    # 1 process: accumulation 2; 2 processes: accumulation 1; the same global batch at every step
    losses_1 = _run([sys.executable, TOYS, "--output_dir", one] + common, one)
    losses_2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(_free_port()), TOYS, "--output_dir", two] + common, two)
    assert sorted(losses_1) == sorted(losses_2) == list(range(1, 7))
    for step in losses_1:
        assert losses_2[step] == pytest.approx(losses_1[step], rel=1e-4), (step, losses_1, losses_2)
    assert losses_1[6] < losses_1[1]  # it trained
    # rank 0 alone wrote the final HF model, gathered from the ZeRO-3 partitions
    from fastrlhf.models.loading import load_causal_lm
    import torch
    a, b = load_causal_lm(one), load_causal_lm(two)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.shape == pb.shape and pa.numel() > 0, name
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Smoke run of benchmarks/fused_moe.py --quick on the CPU (interpreted triton, torch grouped_mm and
the reference), as users run it: the rows carry the roofline fields the GPU suite reports."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_fused_moe_benchmark_records_roofline_rows(tmp_path):
    out = tmp_path / "fused_moe.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "fused_moe.py"), "--quick",
                          "--device", "cpu", "--tokens", "5", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {r["impl"] for r in rows}
    assert {"triton", "reference"} <= impls
    import torch
    assert ("torch_grouped_mm" in impls) == hasattr(torch.nn.functional, "grouped_mm")
    for r in rows:
        assert r["median_ms"] > 0 and r["roofline_ms"] > 0 and r["experts_hit"] >= 1
        assert abs(r["pct_of_roofline"] - 100 * r["roofline_ms"] / r["median_ms"]) < 0.1
        assert r["device"] and r["date"] and r["tokens"] == 5

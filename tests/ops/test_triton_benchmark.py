"""Smoke test of benchmarks/kernels.py --quick on the CPU (torch + triton interpreter):
rows are recorded for every backend and the preference table has the dispatch format.

Run as users run it, `python benchmarks/kernels.py ...` in a subprocess, so the script's own
imports (its folder's `common`, the installed `fastrlhf`) are what is tested."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "kernels.py")


def test_quick_benchmark_records_rows_and_writes_preference_table(tmp_path):
    results = tmp_path / "kernels.jsonl"
    tables = tmp_path / "tables"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--only", "norms,lora,paged_decode,paged_extend,window,packed",
                          "--results", str(results), "--table-dir", str(tables)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert f"appended {len(lines)} rows to {results}" in run.stdout and lines
    impls = {(r["op"], r["impl"]) for r in lines}
    for op in ("rms_norm", "layer_norm", "rotary", "kv_cache_append", "lora_linear", "lora_fuse",
               "paged_attention_decode", "paged_kv_append", "paged_attention_prefill"):
        assert (op, "torch") in impls and (op, "triton") in impls, op
    assert ("lora_linear", "base_gemm") in impls
    assert ("attention_decode(dense)", "torch") in impls and ("attention_prefill(dense)", "torch") in impls
    paged = [r for r in lines if r["op"] in ("paged_attention_decode", "paged_attention_prefill")]
    assert all(r["vs_dense"] > 0 for r in paged)
    assert all(r["pct_of_same_copy"] > 0 for r in paged if r["op"] == "paged_attention_decode")
    for r in lines:
        assert r["device"] and r["date"] and r["median_ms"] > 0
        assert "gbps" not in r or r["pct_of_copy"] == 100 * r["gbps"] / r["copy_gbps"]
    for op in ("attention_prefill(window)", "attention_prefill(alibi)", "attention_decode(window)",
               "attention_prefill(packed)", "attention_prefill(padded)", "attention_prefill_backward(packed)"):
        assert (op, "torch") in impls and (op, "triton") in impls, op
    assert all(r["vs_full"] > 0 and r["ideal_vs_full"] > 1 for r in lines if r["op"].endswith("(window)"))
    assert all(r["vs_padded"] > 0 for r in lines if r["op"].endswith("(packed)"))
    lora = [r for r in lines if r["op"] == "lora_linear" and r["impl"] == "triton"]
    assert all("overhead_pct" in r for r in lora)
    (table_file,) = list(tables.iterdir())
    table = json.loads(table_file.read_text())
    assert table["device"] == lines[0]["device"]
    assert sorted(table["ops"]["rms_norm"]) == ["torch", "triton"]
    assert "rms_norm+residual" not in table["ops"]

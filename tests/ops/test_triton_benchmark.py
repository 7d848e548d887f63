"""Smoke test of benchmarks/kernels.py --quick on the CPU (torch + triton interpreter):
rows are recorded for every backend and the preference table has the dispatch format."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import kernels as kernel_bench  # noqa: E402


def test_quick_benchmark_records_rows_and_writes_preference_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = tmp_path / "kernels.jsonl"
    rows = kernel_bench.main(["--quick", "--device", "cpu", "--only", "norms,lora",
                              "--results", str(results), "--table-dir", str(tmp_path)])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == len(rows) > 0
    impls = {(r["op"], r["impl"]) for r in lines}
    for op in ("rms_norm", "layer_norm", "rotary", "kv_cache_append", "lora_linear", "lora_fuse"):
        assert (op, "torch") in impls and (op, "triton") in impls, op
    assert ("lora_linear", "base_gemm") in impls
    for r in lines:
        assert r["device"] and r["date"] and r["median_ms"] > 0
        assert "gbps" not in r or r["pct_of_copy"] == 100 * r["gbps"] / r["copy_gbps"]
    lora = [r for r in lines if r["op"] == "lora_linear" and r["impl"] == "triton"]
    assert all("overhead_pct" in r for r in lora)
    (table_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    table = json.loads(table_file.read_text())
    assert table["device"] == lines[0]["device"]
    assert sorted(table["ops"]["rms_norm"]) == ["torch", "triton"]
    assert "rms_norm+residual" not in table["ops"]

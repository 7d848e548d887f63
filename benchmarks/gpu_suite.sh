#!/usr/bin/env bash
# The whole GPU check in ONE device call (<= 10 minutes): install the carried wheels and the
# project, build the CUDA extension, run every GPU-marked test (cuda and triton backends,
# engine), run the benchmark suite (kernels, generation, RLHF), write everything under $OUT,
# and print a short table last.
#
#   once, in the checkout:  mkdir -p .whl && cp ../shared/device/wheels/*.whl .whl/
#                           (and keep .whl/ out of git: echo /.whl/ >> .git/info/exclude)
#   device call:            run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"])
#
# Robust by design: no `set -e`; every stage runs under its own time limit, clipped to what
# is left of SUITE_BUDGET seconds (default 570), a failing stage is recorded and the next
# one still runs, and each stage's status, duration and log land in $OUT.
#
# SUITE_STAGES="gpu_tests_backward bench_*" runs only the stages matching those shell patterns
# (the install stages always run): the second call of a session reruns what failed, or the
# stages the first call's budget did not reach, e.g.
#   run(command="SUITE_STAGES='bench_rlhf bench_inject_*' bash benchmarks/gpu_suite.sh", carry=[".whl"])
# (select build_cuda_ext too when a selected stage uses the cuda backend on a fresh machine).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_suite_out}"
mkdir -p "$OUT/logs"
BUDGET="${SUITE_BUDGET:-570}"
START=$(date +%s)
STAGES="$OUT/stages.tsv"
printf "stage\tstatus\tseconds\n" > "$STAGES"
export FASTRLHF_CACHE="${FASTRLHF_CACHE:-/tmp/fastrlhf_ops_cache}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

# run_stage NAME CAP_SECONDS COMMAND...: run with min(CAP, time left - 5 s), log, record.
run_stage() {
  local name="$1" cap="$2"
  shift 2
  local now left limit t0 rc status pattern selected
  if [ -n "${SUITE_STAGES:-}" ] && [[ "$name" != install_* ]]; then
    selected=0
    for pattern in $SUITE_STAGES; do
      # shellcheck disable=SC2053  # the pattern is meant to glob
      [[ "$name" == $pattern ]] && selected=1
    done
    if [ "$selected" -eq 0 ]; then
      printf "%s\tskipped (not in SUITE_STAGES)\t0\n" "$name" >> "$STAGES"
      return 0
    fi
  fi
  now=$(date +%s)
  left=$((BUDGET - (now - START) - 5))
  if [ "$left" -lt 15 ]; then
    printf "%s\tskipped (out of time)\t0\n" "$name" >> "$STAGES"
    echo "== $name: skipped, suite budget spent"
    return 0
  fi
  limit=$((cap < left ? cap : left))
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (rc $rc)" ;;
  esac
  printf "%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STAGES"
  echo "   $status; last lines:"
  tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
  return 0
}

# ---- environment: carried wheels (DeepSpeed and friends) and the project itself
if ls .whl/*.whl > /dev/null 2>&1; then
  run_stage install_wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  printf "install_wheels\tskipped (no .whl/ carried)\t0\n" >> "$STAGES"
fi
run_stage install_project 90 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} > "$OUT/environment.txt"

# ---- CUDA extension (the tests below reuse this build through FASTRLHF_CACHE)
run_stage build_cuda_ext 240 "$PY" -c "
import sys, time
t0 = time.time()
from fastrlhf.ops import cuda_backend, cuda_build
ok, why = cuda_backend.load_extension()
print(cuda_build.status_report())
print(f'build+load wall seconds: {time.time() - t0:.1f}')
sys.exit(0 if ok else 1)"

# ---- every GPU-marked test: the cuda backend first (its own time limit), then the rest
# (triton, engine, ...), so a slow group cannot starve the other of its verdict
run_stage gpu_tests_cuda 150 "$PY" -m pytest -m gpu tests/gpu/test_cuda_ops.py -q -p no:cacheprovider -rfE \
  --junitxml="$OUT/gpu_tests_cuda.xml" --durations=10
# the triton backward tests (bf16, large shapes) have their own stage: their autotuning is long
BWD_TESTS="tests/gpu/test_triton_gpu.py::test_attention_backward_large tests/gpu/test_triton_gpu.py::test_norm_backward_large tests/gpu/test_triton_gpu.py::test_torch_compile_sees_through_the_backward_ops"
run_stage gpu_tests_other 210 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider -rfE \
  --ignore=tests/gpu/test_cuda_ops.py --ignore=tests/gpu/test_paged_gpu.py --ignore=tests/gpu/test_attention_rules_gpu.py \
  $(for t in $BWD_TESTS; do printf -- "--deselect %s " "$t"; done) \
  --junitxml="$OUT/gpu_tests_other.xml" --durations=10
# shellcheck disable=SC2086  # BWD_TESTS is a list of test ids
run_stage gpu_tests_backward 120 "$PY" -m pytest -m gpu $BWD_TESTS -q -p no:cacheprovider -rfE \
  --junitxml="$OUT/gpu_tests_backward.xml" --durations=10

# the paged KV-cache ops (triton and cuda backends): their own stage, their autotuning is long too
run_stage gpu_tests_paged 150 "$PY" -m pytest -m gpu tests/gpu/test_paged_gpu.py -q -p no:cacheprovider -rfE \
  --junitxml="$OUT/gpu_tests_paged.xml" --durations=10

# sliding window, ALiBi and packed sequences in the dense attention kernels (new constexpr variants:
# each autotunes on first use, hence their own stage)
run_stage gpu_tests_attention_rules 150 "$PY" -m pytest -m gpu tests/gpu/test_attention_rules_gpu.py -q \
  -p no:cacheprovider -rfE --junitxml="$OUT/gpu_tests_attention_rules.xml" --durations=10

# ---- benchmarks: kernels first (they write the backend preference table), then end to end
mkdir -p "$OUT/tables"
if [ -f benchmarks/kernels.py ]; then
  run_stage bench_kernels 150 "$PY" benchmarks/kernels.py --only prefill,decode,lora,norms \
    --results "$OUT/kernels.jsonl" --table-dir "$OUT/tables"
  # attention backward vs SDPA's flash backend (target: >= 0.8x its TFLOP/s at head dim 128), norm backward
  run_stage bench_kernels_backward 100 "$PY" benchmarks/kernels.py --only prefill_bwd,norms_bwd \
    --results "$OUT/kernels.jsonl" --table-dir "$OUT/tables"
fi
# paged decode (target: >= 80% of the bandwidth of a copy of the same bytes, batch 32-128, 1k-8k keys)
# and paged extend/prefill, each against the dense kernel on the same keys; adds the paged ops to the table
if [ -f benchmarks/kernels.py ]; then
  run_stage bench_paged 120 "$PY" benchmarks/kernels.py --only paged_decode,paged_extend \
    --results "$OUT/kernels.jsonl" --table-dir "$OUT/tables"
fi
# windowed prefill/decode against the same kernels without the window (target: the time falls with
# the work, vs_full close to ideal_vs_full), ALiBi's overhead, and packed prefill forward/backward
# against the same sequences padded (vs_padded), interleaved
if [ -f benchmarks/kernels.py ]; then
  run_stage bench_attention_rules 120 "$PY" benchmarks/kernels.py --only window,packed \
    --results "$OUT/kernels.jsonl" --table-dir "$OUT/tables"
fi
# The two prefill kernels (WMMA default, mma.sync opt-in) against SDPA, in the same run.
run_stage bench_prefill_variants 60 "$PY" - "$OUT/prefill_variants.jsonl" <<'PYBENCH'
import json, os, sys, torch
import torch.nn.functional as F
from fastrlhf.ops import cuda_backend as cb
assert cb.load_extension()[0], "cuda extension not loaded"
def median_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); fn(); e1.record(); torch.cuda.synchronize(); times.append(e0.elapsed_time(e1))
    return sorted(times)[len(times) // 2]
rows = []
for b, h, s, d in [(4, 32, 2048, 128), (1, 32, 4096, 128), (1, 32, 8192, 128), (8, 16, 1024, 64)]:
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * b * h * s * s * d / 2  # causal
    res = {"sdpa": median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    for kind in ("wmma", "mma"):
        os.environ["FASTRLHF_PREFILL_KERNEL"] = kind
        res[kind] = median_ms(lambda: cb.attention_prefill(q, k, v, causal=True))
    for impl, t in res.items():
        rows.append({"bench": "prefill_variants", "shape": f"{b}x{h}x{s}x{d}", "impl": impl, "median_ms": t,
                     "tflops": flops / t / 1e9, "vs_sdpa": res["sdpa"] / t})
        print(rows[-1])
with open(sys.argv[1], "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
PYBENCH
if [ -f benchmarks/generation.py ]; then
  run_stage bench_generation 120 "$PY" benchmarks/generation.py --gpu --out "$OUT/generation.jsonl"
  # generation past a sliding window (Mistral-shaped 1.3B, window 128, 256 + 256 tokens): the
  # engine's windowed prefill and decode end to end, against HF generate
  run_stage bench_generation_window 120 "$PY" benchmarks/generation.py --gpu --models mistral-sw-1.3b \
    --runs 3 --out "$OUT/generation.jsonl"
fi
if [ -f benchmarks/rollout_workloads.py ]; then
  # the rollout engine: continuous vs static batching on long-tail answers, G answers per prompt
  # with shared vs repeated prompts (prefill time, KV memory), on the bundled task's SFT model
  run_stage bench_rollout_long_tail 90 "$PY" benchmarks/generation.py --gpu --workload long-tail --runs 5 \
    --workdir /tmp/fastrlhf_rollout_bench --note gpu_suite --out "$OUT/generation.jsonl"
  run_stage bench_rollout_groups 60 "$PY" benchmarks/generation.py --gpu --workload grpo-groups --runs 5 \
    --workdir /tmp/fastrlhf_rollout_bench --note gpu_suite --out "$OUT/generation.jsonl"
  # what the trainer's rollout call (and inject + HF generate) adds around the engine's generate
  run_stage bench_rollout_path 45 "$PY" benchmarks/generation.py --gpu --workload rollout-path --runs 10 \
    --workdir /tmp/fastrlhf_rollout_bench --note gpu_suite --out "$OUT/generation.jsonl"
fi
if [ -f benchmarks/rlhf.py ]; then
  run_stage bench_rlhf 120 "$PY" benchmarks/rlhf.py --gpu --out "$OUT/rlhf.jsonl"
  # multi-turn GRPO (3 turns, an environment in a worker): the engine's session vs every turn
  # generated anew; time per step split into generation, environment and training
  run_stage bench_rlhf_agent 150 "$PY" benchmarks/rlhf.py --preset opt-1.3b-agent --iters 2 --sequential --out "$OUT/rlhf.jsonl"
fi
if [ -f benchmarks/token_logprobs.py ]; then
  # fused log-probs vs log_softmax(logits).gather, bf16 forward+backward: time and peak memory
  run_stage bench_token_logprobs 90 "$PY" benchmarks/token_logprobs.py --device cuda --dtype bfloat16 \
    --out "$OUT/token_logprobs.jsonl"
fi
if [ -f benchmarks/fused_moe.py ]; then
  # the fused MoE kernel at published layer shapes vs the grouped-GEMM roofline (target at 64 tokens:
  # >= 60%), torch grouped_mm and the reference, bf16
  run_stage bench_fused_moe 90 "$PY" benchmarks/fused_moe.py --device cuda --out "$OUT/fused_moe.jsonl"
fi
if [ -f benchmarks/packing.py ]; then
  # training without padding: update-phase time and peak CUDA memory, packed vs padded (arithmetic
  # GRPO on an actor SFT-trained here, default-task SFT, ragged 5..200-token answers), interleaved
  run_stage bench_packing 150 "$PY" benchmarks/packing.py --gpu --workdir /tmp/packing_bench --rounds 5 \
    --sft_steps 100 --out "$OUT/packing.jsonl"
fi
if [ -f benchmarks/inject_training.py ]; then
  # one training step of an injected ~0.5B Llama (triton attention + norms, forward and backward)
  # against the same model on HF sdpa, bf16
  run_stage bench_inject_training 90 "$PY" benchmarks/inject_training.py --gpu --out "$OUT/inject_training.jsonl"
fi
if [ -f benchmarks/peers.py ]; then
  # one GRPO step: fastrlhf (defaults and --packing false) vs TRL's GRPOTrainer and TRL with
  # inject(generate=True); needs trl
  # (pip install -e ".[peers]"; on an offline machine carry its wheel in .whl/), else recorded as skipped
  if "$PY" -c "import trl" > /dev/null 2>&1; then
    run_stage bench_peers 240 "$PY" benchmarks/peers.py --gpu --workdir /tmp/fastrlhf_peers --rounds 2 \
      --setups fastrlhf fastrlhf-padded trl trl+inject \
      --note gpu_suite --out "$OUT/peers.jsonl"
  else
    printf "bench_peers\tskipped (trl not installed)\t0\n" >> "$STAGES"
  fi
fi

# ---- short table last
"$PY" - "$OUT" <<'EOF' > "$OUT/summary.md" 2>&1
import json, os, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
print("| stage | status | s |\n| --- | --- | --- |")
with open(os.path.join(out, "stages.tsv")) as f:
    for line in list(f)[1:]:
        print("| " + " | ".join(line.rstrip("\n").split("\t")) + " |")
for group in ("cuda", "other", "backward", "paged", "attention_rules"):
    xml = os.path.join(out, f"gpu_tests_{group}.xml")
    if os.path.exists(xml):
        s = ET.parse(xml).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        print(f"\ngpu tests ({group}): {s.get('tests')} run, {s.get('failures')} failed, "
              f"{s.get('errors')} errors, {s.get('skipped')} skipped")
kj = os.path.join(out, "kernels.jsonl")
if os.path.exists(kj):
    rows = [json.loads(l) for l in open(kj) if l.strip()]
    cols = ["op", "shape", "impl", "median_ms", "tflops", "gbps", "pct_of_copy", "overhead_pct", "vs_sdpa_flash",
            "vs_dense", "pct_of_same_copy", "vs_full", "ideal_vs_full", "vs_padded"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("\n| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        vals = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals) + " |")
for name in ("prefill_variants.jsonl", "generation.jsonl", "rlhf.jsonl", "token_logprobs.jsonl", "peers.jsonl"):
    p = os.path.join(out, name)
    if os.path.exists(p):
        print(f"\n{name}:")
        for l in open(p):
            if l.strip():
                r = json.loads(l)
                keep = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in keep.items()))
EOF
echo
echo "==== fastrlhf GPU suite: $(( $(date +%s) - START ))s, results in $OUT"
cat "$OUT/summary.md"

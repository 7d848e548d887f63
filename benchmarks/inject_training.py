"""One training step (forward + backward + AdamW) of an HF Llama, plain (`sdpa` attention, HF
norms) against the same model after `fastrlhf.inject(model)` (fastrlhf attention and norms,
forward and backward on the selected kernel backend): issue 11's "an injected training step no
slower than sdpa".

    python benchmarks/inject_training.py --gpu --out results.jsonl     # bf16, backend triton
    python benchmarks/inject_training.py --quick                       # CPU smoke run, fp32, torch

Both models start from the same weights and see the same batch (right-padded rows of mixed
length, so the padding mask is exercised). Each step is timed as a whole (median of --reps after
warm-up); the ratio plain / injected is computed from numbers taken in the same run, with the two
variants interleaved per repetition so drift hits both alike. The first step's loss of each is
recorded too, so a fast but wrong step shows up in the row. CPU numbers only say the code runs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import common


def _model(size: str, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "gpu":  # about 0.5B parameters: head dim 128, GQA 2:1
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _batch(vocab: int, batch: int, seq: int, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="bf16 on CUDA, the ~0.5B model, backend triton")
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU (fp32, torch backend)")
    ap.add_argument("--backend", default=None, help="kernel backend for the injected model "
                    "(default: triton on a GPU, torch on the CPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="append the rows to this .jsonl")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here; run without --gpu (CPU smoke run) or on a GPU machine")
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    backend = args.backend or ("triton" if args.gpu else "torch")
    batch = args.batch or (4 if args.gpu else 2)
    seq = args.seq or (2048 if args.gpu else 33)
    reps = args.reps or (20 if args.gpu else 5)

    import fastrlhf
    from fastrlhf import ops

    plain = _model("gpu" if args.gpu else "tiny", dtype, device)
    injected = fastrlhf.inject(copy.deepcopy(plain))
    data = _batch(plain.config.vocab_size, batch, seq, device)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)
            for name, m in (("sdpa", plain), ("injected", injected))}
    models = {"sdpa": plain, "injected": injected}

    def step(name):
        out = models[name](**data)
        out.loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return out.loss.detach()

    ops.set_backend(backend)
    try:
        first = {name: float(step(name)) for name in models}  # also warms up (autotuning, caches)
        for name in models:
            step(name)
        times = {name: [] for name in models}
        for _ in range(reps):
            for name in models:
                _sync(device)
                t0 = time.perf_counter()
                step(name)
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        ops.set_backend(None)
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = int(data["attention_mask"].sum())
    info = common.device_info(device)
    if device.type == "cpu":
        info.update(common.machine_load())
    rows = []
    for name in models:
        rows.append({"bench": "inject_training", "impl": name,
                     "backend": backend if name == "injected" else "hf-sdpa",
                     "dtype": str(dtype).replace("torch.", ""), "batch": batch, "seq": seq, "reps": reps,
                     "params": sum(p.numel() for p in plain.parameters()), "median_ms": med[name],
                     "tokens_per_s": tokens / med[name] * 1e3, "first_loss": first[name],
                     "vs_sdpa": med["sdpa"] / med[name], **info})
    print(common.markdown_table(rows, ["impl", "backend", "dtype", "batch", "seq", "median_ms",
                                       "tokens_per_s", "first_loss", "vs_sdpa"]))
    if abs(first["sdpa"] - first["injected"]) > (5e-2 if dtype != torch.float32 else 1e-4) * abs(first["sdpa"]):
        print(f"WARNING: first-step losses differ: sdpa {first['sdpa']:.6g}, injected {first['injected']:.6g}")
    if args.out:
        common.append_jsonl(args.out, rows)
    return rows


if __name__ == "__main__":
    main()

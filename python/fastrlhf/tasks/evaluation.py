"""Held-out evaluation of the bundled tasks with the hybrid engine: pass@k of the arithmetic task
(k answers sampled per held-out prompt, scored by the task's exact reward), run by `fastrlhf
train --task arithmetic` before and after RL (`rlhf.pipeline`); the same for the calculator task
with multi-turn answers that call the tool (`evaluate_tool_pass_at_k`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from fastrlhf.tasks import arithmetic_task

# held-out prompts and samples per prompt of `fastrlhf train --task arithmetic`'s report
ARITHMETIC_EVAL = {"prompts": 150, "k": 8}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_pass_at_k(model_dir: str, items: List[Dict[str, Any]], k: int = 8, *, temperature: float = 1.0,
                       max_new_tokens: int = 16, batch_prompts: int = 32, seed: int = 0,
                       tokenizer=None) -> Dict[str, float]:
    """Sample k answers (temperature, seeded) to each held-out prompt item (step-3 items with
    an `answer` column) with the hybrid engine; score them with the task's exact scorer.
    Returns {"pass@1", f"pass@{k}", "greedy", "prompts"}."""
    import torch
    from fastrlhf.data import PromptCollator
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.rewards import arithmetic_reward

    tokenizer = tokenizer or load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, tokenizer=tokenizer).eval()
    engine = HybridEngine(model, tokenizer, EngineConfig())
    collate = PromptCollator(tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    p1 = pk = greedy = 0.0
    for start in range(0, len(items), batch_prompts):
        chunk = items[start:start + batch_prompts]
        batch = collate([it for it in chunk for _ in range(k)])
        answers = [it["columns"]["answer"] for it in chunk]
        for do_sample in (True, False):
            ids, mask = (batch["input_ids"], batch["attention_mask"]) if do_sample else (
                batch["input_ids"][::k], batch["attention_mask"][::k])
            out = engine.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, generator=generator)
            texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)
            reps = k if do_sample else 1
            right = arithmetic_reward([""] * len(texts), texts, answer=[a for a in answers for _ in range(reps)])
            if not do_sample:
                greedy += sum(right)
                continue
            for i in range(len(chunk)):
                c = int(sum(right[i * k:(i + 1) * k]))
                p1 += c / k
                pk += pass_at_k(k, c, k)
    n = max(len(items), 1)
    return {"pass@1": p1 / n, f"pass@{k}": pk / n, "greedy": greedy / n, "prompts": float(len(items))}


def heldout_items(tokenizer, data_spec=None, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The step-3 held-out prompt items of the task (with their `answer` column)."""
    from fastrlhf.data import DataSpec, build_datasets
    spec = data_spec or DataSpec(paths=[arithmetic_task.arithmetic_data_path()], split_ratios=arithmetic_task.SPLIT_RATIOS)
    eval_ds = build_datasets(spec, tokenizer, 3)[1]
    n = len(eval_ds) if limit is None else min(limit, len(eval_ds))
    return [eval_ds[i] for i in range(n)]


def arithmetic_accuracy(cfg, model_dir: str) -> Dict[str, float]:
    """Held-out pass@1 / pass@k of the arithmetic task (step-3 held-out prompts of `cfg`'s data, k
    samples each at `cfg`'s temperature), printed as one line."""
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.utils.logging import print_rank0
    tok = load_tokenizer(model_dir, padding_side="left")
    items = heldout_items(tok, cfg.data, ARITHMETIC_EVAL["prompts"])
    res = evaluate_pass_at_k(model_dir, items, ARITHMETIC_EVAL["k"], temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens or cfg.data.max_answer_len, seed=cfg.seed,
                             tokenizer=tok)
    print_rank0(f"[arithmetic] {model_dir}: held-out pass@1 {res['pass@1']:.3f}, pass@{ARITHMETIC_EVAL['k']} "
                f"{res['pass@' + str(ARITHMETIC_EVAL['k'])]:.3f}, greedy {res['greedy']:.3f} "
                f"({int(res['prompts'])} prompts)")
    return res


def arithmetic_accuracy_line(before: Dict[str, float], after: Dict[str, float]) -> str:
    """The summary line: held-out accuracy before -> after RL."""
    k = ARITHMETIC_EVAL["k"]
    b, a = before, after
    return (f"arithmetic held-out accuracy ({int(a['prompts'])} prompts, {k} samples each, temperature as in RL): "
            f"pass@1 {b['pass@1']:.3f} -> {a['pass@1']:.3f}, pass@{k} {b[f'pass@{k}']:.3f} -> {a[f'pass@{k}']:.3f}, "
            f"greedy {b['greedy']:.3f} -> {a['greedy']:.3f}")


# `fastrlhf train --task arithmetic`'s held-out numbers (README, measured 2026-12-02 at 97468c9,
# pinned to AVX2: 150 prompts, 8 samples each), printed beside the calculator task's: problems of
# the same generator without the tool
ARITHMETIC_REFERENCE = {"pass@1": (0.309, 0.424), "pass@8": (0.887, 0.840), "greedy": (0.693, 0.527)}


def evaluate_tool_pass_at_k(model_dir: str, items: List[Dict[str, Any]], k: int = 8, *, tools: List[str],
                            temperature: float = 1.0, max_new_tokens: int = 16, max_turns: int = 3,
                            max_observation_tokens: int = 16, batch_prompts: int = 32, seed: int = 0,
                            tokenizer=None) -> Dict[str, float]:
    """`evaluate_pass_at_k` for multi-turn answers with tools: k trajectories sampled per held-out
    item and one greedy, each run with the tool environment on the engine's sessions, scored on the
    trajectory's text by the calculator task's exact reward."""
    import torch
    from fastrlhf.agents.rollout import AgentLimits, MultiTurnRollout
    from fastrlhf.agents.tool_env import ToolEnvironment
    from fastrlhf.hybrid_engine import EngineConfig, HybridEngine
    from fastrlhf.models.loading import load_causal_lm, load_tokenizer
    from fastrlhf.rewards import calculator_reward

    tokenizer = tokenizer or load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, tokenizer=tokenizer).eval()
    engine = HybridEngine(model, tokenizer, EngineConfig())
    env = ToolEnvironment(tools)
    limits = AgentLimits(max_turns=max_turns, max_new_tokens=max_new_tokens,
                         max_observation_tokens=max_observation_tokens)
    sampler = MultiTurnRollout(engine, tokenizer, env, limits, temperature=temperature)
    greedy_rollout = MultiTurnRollout(engine, tokenizer, env, limits, do_sample=False)
    generator = torch.Generator().manual_seed(seed)
    p1 = pk = greedy = 0.0
    try:
        for start in range(0, len(items), batch_prompts):
            chunk = items[start:start + batch_prompts]
            answers = [it["columns"]["answer"] for it in chunk]
            trajs = sampler.run([it for it in chunk for _ in range(k)], seeds=generator)
            right = calculator_reward([""] * len(trajs), [t.completion_text(tokenizer) for t in trajs],
                                      answer=[a for a in answers for _ in range(k)])
            for i in range(len(chunk)):
                c = int(sum(right[i * k:(i + 1) * k]))
                p1 += c / k
                pk += pass_at_k(k, c, k)
            trajs = greedy_rollout.run(chunk, seeds=0)
            greedy += sum(calculator_reward([""] * len(trajs), [t.completion_text(tokenizer) for t in trajs],
                                            answer=answers))
    finally:
        env.shutdown()
    n = max(len(items), 1)
    return {"pass@1": p1 / n, f"pass@{k}": pk / n, "greedy": greedy / n, "prompts": float(len(items))}


def calculator_accuracy(cfg, model_dir: str) -> Dict[str, float]:
    """Held-out pass@1 / pass@k / greedy of the calculator task (the RL data's held-out prompts,
    answered with the tool over several turns), printed as one line."""
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.utils.logging import print_rank0
    tok = load_tokenizer(model_dir, padding_side="left")
    items = heldout_items(tok, cfg.data, ARITHMETIC_EVAL["prompts"])
    k = ARITHMETIC_EVAL["k"]
    res = evaluate_tool_pass_at_k(model_dir, items, k, tools=list(cfg.tools), temperature=cfg.temperature,
                                  max_new_tokens=cfg.max_new_tokens or cfg.data.max_answer_len,
                                  max_turns=cfg.max_turns, max_observation_tokens=cfg.max_observation_tokens,
                                  seed=cfg.seed, tokenizer=tok)
    print_rank0(f"[calculator] {model_dir}: held-out pass@1 {res['pass@1']:.3f}, pass@{k} {res[f'pass@{k}']:.3f}, "
                f"greedy {res['greedy']:.3f} ({int(res['prompts'])} prompts)")
    return res


def calculator_accuracy_line(before: Dict[str, float], after: Dict[str, float]) -> str:
    """The summary line: held-out accuracy before -> after RL, and the arithmetic task's (no tool)."""
    k = ARITHMETIC_EVAL["k"]
    ref = ARITHMETIC_REFERENCE
    return (arithmetic_accuracy_line(before, after).replace("arithmetic held-out", "calculator held-out", 1)
            + f"\n  beside --task arithmetic (no tool; README, 2026-12-02): pass@1 {ref['pass@1'][0]:.3f} -> "
            f"{ref['pass@1'][1]:.3f}, pass@{k} {ref['pass@8'][0]:.3f} -> {ref['pass@8'][1]:.3f}, greedy "
            f"{ref['greedy'][0]:.3f} -> {ref['greedy'][1]:.3f}")

"""End-of-run picture of step 3: reward, ground-truth score and KL over PPO steps (one PNG)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

PANELS = (("reward_mean", "reward"), ("gt_score", "ground-truth score"), ("kl", "KL to reference"))


def plot_ppo_history(history: Sequence[Dict[str, float]], path: str,
                     panels: Sequence = PANELS) -> str:
    """Write `path` (PNG) with one panel per metric present in `history` (a list of per-step
    dicts with a "step" key); a faint raw line plus a moving average, so trends read through
    the noise of small batches. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")  # files only: works without a display, on any rank
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in panels if any(k in h for h in history)]
    if not present:
        raise ValueError(f"none of {[k for k, _ in panels]} is in the run history; nothing to plot")
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], present):
        pts = [(h["step"], h[key]) for h in history if key in h]
        steps, vals = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, vals, color="tab:blue", alpha=0.35, linewidth=1)
        ax.plot(steps, _moving_average(vals, max(1, len(vals) // 10)), color="tab:blue", linewidth=2)
        ax.set_title(label, loc="left", fontsize=10)  # a y label longer than the panel would be clipped
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("PPO step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _moving_average(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out

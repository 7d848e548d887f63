"""fastrlhf: RLHF (SFT -> reward model -> PPO) on DeepSpeed with a hybrid generation engine."""
__version__ = "0.1.0"


def inject(model, **kwargs):
    """Make an HF model's forward and backward use fastrlhf ops; with generate=True, also run
    `model.generate` through the hybrid engine (see fastrlhf.hybrid_engine.injection)."""
    from fastrlhf.hybrid_engine import inject as _inject

    return _inject(model, **kwargs)

"""fastrlhf: RLHF (SFT -> reward model -> PPO) on DeepSpeed with a hybrid generation engine."""
__version__ = "0.1.0"

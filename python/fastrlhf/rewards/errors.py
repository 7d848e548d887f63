"""The reward package's errors: one line each, naming the source (function or URL) and the fix.
The CLI prints them without a traceback."""


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable; the run stops before the update."""


class RewardSpecError(ValueError):
    """A --reward_fn / --reward_url that cannot be used (checked before any model loads)."""


class RewardTimeoutError(RewardError):
    """A reward function or server did not answer within --reward_timeout."""

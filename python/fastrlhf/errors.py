"""Every error fastrlhf raises for something the user can fix, on the ground floor of the package:
it imports nothing, so any module may raise any of them without an import circle. Each message
is one line that names the problem and the fix; the CLI prints it without a traceback (exit
status 2 for bad input, 1 for a run that stopped)."""


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says which key and how."""


class ModelPathError(ConfigError):
    """A model path that cannot be what it is asked to be: missing, empty, a run rather than a
    model, the wrong kind of model, or a hub name that cannot be reached. `path` is the path."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


class DataError(ValueError):
    """Bad or unreadable data; the message names the file, row and column, and the fix."""


class RewardError(RuntimeError):
    """A reward source failed or returned something unusable; the run stops before the update."""


class RewardSpecError(ValueError):
    """A --reward_fn / --reward_url that cannot be used (checked before any model loads)."""


class RewardTimeoutError(RewardError):
    """A reward function or server did not answer within --reward_timeout."""


class AgentError(RuntimeError):
    """An environment or tool worker failed at run time (raised, hung, answered something
    malformed); the run stops before the update. Bad tool calls of the model are not errors: they
    are answered to the model."""


class TrainingDiverged(RuntimeError):
    """The run stopped because its numbers went NaN/inf; the message names the step, the quantity
    and what to change. Nothing non-finite was saved."""


class NonFiniteLossError(TrainingDiverged):
    """Step 3's kind of TrainingDiverged (a NaN/inf loss, reward, value or log-prob)."""


class SaveError(RuntimeError):
    """A model or checkpoint that did not come out whole (a full disk, a quota); nothing was replaced."""


# what the CLI reports as bad input (exit status 2)
USER_INPUT_ERRORS = (ConfigError, DataError, RewardError, AgentError)

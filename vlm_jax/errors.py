"""The base class of errors caused by a user's input (config, files, arguments).

The `vlm-jax` command prints these as one sentence and exits with status 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with what the user gave us, explained in one sentence."""


class ConfigError(UserError):
    """A config that cannot work, explained in one sentence."""


class NonFiniteError(UserError):
    """A run stopped because its gradients stayed NaN or infinite, explained in one sentence."""

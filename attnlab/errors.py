"""User-facing errors: one line, naming the cause. Internal invariants use ``assert``."""

from __future__ import annotations


class AttnlabError(Exception):
    """Base class for errors caused by user input (manifest, data, checkpoint, CLI).

    The CLI prints ``str(err)`` on one line and exits non-zero; no traceback.
    """


class ConfigError(AttnlabError):
    """Invalid configuration; the message names the key path and the offending value."""

    def __init__(self, path: str, message: str, value: object = None, *, show_value: bool = True):
        self.path = path
        self.value = value
        where = path or "<root>"
        text = f"{where}: {message}"
        if show_value:
            text += f" (got {value!r})"
        super().__init__(text)

    def __reduce__(self):  # picklable: raised in a worker process, it reaches the parent intact
        return (_restore_config_error, (self.args[0], self.path, repr(self.value)))


def _restore_config_error(text: str, path: str, value: str) -> ConfigError:
    err = ConfigError.__new__(ConfigError)
    Exception.__init__(err, text)
    err.path, err.value = path, value
    return err


class DataError(AttnlabError):
    """A missing, unreadable or inconsistent data file."""


class CheckpointError(AttnlabError):
    """A missing, corrupted, truncated or incompatible checkpoint."""


class InputError(AttnlabError, ValueError):
    """Model input the model cannot take (e.g. a sequence longer than one forward pass allows)."""

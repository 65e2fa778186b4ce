"""User errors: bad input the user can fix (a config value, a data file, a checkpoint, an adapter).

Every entry point (train.py, predict, export, inspect_prompt) catches `UserError` and prints its
one-line message and exits 2, without a traceback; anything else is a bug and keeps its traceback.
Raise the subclass that names the input, so a message always says what to fix. Each subclass is
also the builtin type callers catch today (ValueError, KeyError, FileNotFoundError), so code that
catches those keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input, with a message that names the file/key/line to fix."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError quotes its message: keep it readable
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A config key or value (composed by Hydra) is wrong: checked before any model load."""


class DataError(UserError, ValueError):
    """A data file or source is wrong: names the file, line and column."""


class DataColumnError(UserError, KeyError):
    """A column a data config names is missing from a row."""


class DataFileNotFound(UserError, FileNotFoundError):
    """A data file does not exist."""


class DataSourceUnavailable(UserError, ConnectionError):
    """A hub data source cannot be reached (offline): the message says how to use a local copy."""


class CheckpointError(UserError, ValueError):
    """A resume checkpoint (`ckpt_path`) is missing, damaged, unsafe or of another run."""


class AdapterError(UserError, ValueError):
    """An adapter directory (adapter_config.json + safetensors) is missing, damaged or incomplete."""


class OutputError(UserError, ValueError):
    """An output location would destroy something: it is an input (or inside one), or a non-empty
    folder the user did not allow to be overwritten."""


def user_error_message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class IncompatibleVersion(UserError, ImportError):
    """An installed transformers/Lightning outside the tested range, or one whose internals changed:
    the message gives the tested range and the pip line that installs it."""

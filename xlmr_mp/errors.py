"""Errors every layer may raise; a leaf module (no project imports), so any file can import it.
Each message names the option or the file and the fix."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the option and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and what is wrong with it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint where one was named: a missing meta.json, model file or `latest` target."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects other than tensors and plain Python values (refused unread)."""

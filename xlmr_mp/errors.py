"""Errors every layer may raise; a leaf module (no project imports), so any file can import it."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the option and the fix."""

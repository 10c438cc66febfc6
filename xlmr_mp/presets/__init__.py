"""Run presets shipped inside the package: xlmr_mp/presets/<name>.yaml (tiny, base, large, xl, xxl,
mmbert_like), installed with it (package data), so a wheel has them too.

Three ways to name one, resolved here and nowhere else:
    xlmr-train --preset tiny key=value ...            the --preset option (xlmr-train, xlmr-plan,
                                                      launch/*.sh and *.slurm, launch/tools/check_layout.py)
    --config preset:tiny                              wherever a config file path is accepted
                                                      (CONFIG=preset:base for the launchers)
    preset: base                                      the first key of a YAML file of your own (or of a
                                                      study spec): start from that preset, then the file
Precedence (xlmr_mp.config.load_config): dataclass defaults < the preset < the --config file <
key=value overrides.
"""
from __future__ import annotations

import os
from typing import List

from xlmr_mp.errors import ConfigError

PRESET_DIR = os.path.dirname(os.path.abspath(__file__))
PREFIX = "preset:"


def preset_names() -> List[str]:
    """The shipped presets, sorted."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def preset_path(name: str) -> str:
    """The YAML file of preset `name`; ConfigError listing the presets when there is none."""
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not name or os.sep in name or not os.path.isfile(path):
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())} "
                          f"(or give a YAML file of your own with --config FILE)")
    return path


def resolve_config(ref: str) -> str:
    """A config reference as a file path: `preset:NAME` -> that preset's file; anything else unchanged."""
    return preset_path(ref[len(PREFIX):]) if ref.startswith(PREFIX) else ref

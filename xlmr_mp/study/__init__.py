"""Scaling studies: spec, plan, shared preparation, runner, report (tools/study.py)."""

"""The `gmwae` command line, above everything it drives: gmwae_core (train, evaluate),
study/ (run, resume, status, export, confirm, validate) and dashboards/ (dashboard)."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]

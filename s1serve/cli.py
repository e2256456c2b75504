"""The console script's entry (`s1serve = s1serve.cli:main`); the command lives in s1serve.entrypoints.cli."""

from s1serve.entrypoints.cli import main

__all__ = ["main"]

"""The argument parser every s1serve command uses: no prefix abbreviations, defaults shown in --help, `--a_b`
read as `--a-b` (as vLLM's parser does), and an unknown flag reported with the usage of the command that got it."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: ...)` for every option, also those declared without a help text, unless the help text
    already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def dash_spelling(args: Sequence[str]) -> list[str]:
    """`--gpu_memory_utilization=0.8` -> `--gpu-memory-utilization=0.8`: underscores in a long option's name (not
    in its value) become dashes; nothing after a bare `--` is touched."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        if arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with s1serve's rules (see the module's docstring); subcommands inherit them."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = dash_spelling(sys.argv[1:] if args is None else args)
        parsed, extra = super().parse_known_args(args, namespace)
        if extra and not self._subparsers:
            # A leaf command: its own usage, not the top-level one (where argparse would report them).
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra

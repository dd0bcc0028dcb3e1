"""What every command line of the package shares: help that shows each option's default, with the description's
and epilog's own line breaks kept (they hold usage examples), and the program name as the user typed it."""

from __future__ import annotations

import argparse
import os
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after each option's help, written as the user would type it (``--seeds 0 1 2``), except for
    switches (``store_true``: off unless given), options without a default value (None, empty: their help says
    what happens instead) and help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        no_value = default is None or default is argparse.SUPPRESS or default in ("", [])
        if switch or no_value or "%(default)" in text or "default:" in text:
            return text
        if not action.option_strings:
            return super()._get_help_string(action)
        return f"{text} (default: {format_default(default).replace('%', '%%')})"


def format_default(value: object) -> str:
    """A default as the user would type it (lists and tuples space-separated, as ``nargs`` options take them)."""
    if isinstance(value, (list, tuple)):
        return " ".join(format_default(item) for item in value)
    return str(value)


def prog_name(module: str, script: str) -> str:
    """The program name as the user typed it: the console ``script`` (``es-digits``) when that is what runs, else
    ``python3 -m module`` (argparse's own guess would be ``__main__.py``)."""
    return script if os.path.basename(sys.argv[0]) == script else f"python3 -m {module}"

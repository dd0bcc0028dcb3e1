"""Progress bars for the training commands: shown on a terminal, silent in a log file or a pipe.

tqdm redraws its bar with carriage returns; written to a file (a CI log, ``cmd > run.log 2>&1``) every redraw stays
as one more copy of the line. So a bar is drawn only when progress is wanted (no ``--no-progress``) *and* stderr,
where tqdm writes, is a terminal; otherwise the caller gets :class:`NoProgress`, which accepts the same calls and
writes nothing. Every training command (``es-digits``, ``es-vit``, ...) adds its switch with
:func:`add_progress_argument` and opens its bars with :func:`progress_bar`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class NoProgress:
    """The part of tqdm's interface the commands use, doing nothing."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def shows_progress(wanted: bool = True) -> bool:
    """Whether a bar would be drawn: wanted, and stderr is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(wanted and isatty is not None and isatty())


def progress_bar(*, wanted: bool = True, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar on stderr when :func:`shows_progress`, else a :class:`NoProgress` (tqdm is then not imported)."""
    if not shows_progress(wanted):
        return NoProgress()
    from tqdm import tqdm

    return tqdm(file=sys.stderr, **tqdm_kwargs)


def add_progress_argument(parser: argparse.ArgumentParser | Any) -> None:
    """The shared ``--no-progress`` switch (``args.no_progress``); a parser or an argument group."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are also off when stderr is not a terminal, e.g. redirected to a log)",
    )

"""Progress bars on stderr, from tqdm: the images of a batch, the forwards of a
method, the bytes of a download. Callers draw one only when asked (on a terminal,
without -q)."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def on_terminal() -> bool:
    """Whether stderr is a terminal (False for a closed or replaced stream)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, enabled: bool, unit: str,
                 **options: Any) -> tqdm[Any]:
    """A bar counting ``unit`` up to ``total`` (None: unknown), with its rate and the
    time left; a disabled one (or one with nothing to count) draws nothing.
    ``options`` go to tqdm (``desc``, ``initial``, ``mininterval``…).

    ``clear()`` takes the bar off its line before other text goes to the terminal
    (stdout and stderr often share one); the next ``update()`` draws it again.
    End it with :func:`finish`; a bar left unfinished (an exception) is erased.
    """
    from tqdm import tqdm  # here: most runs draw no bar
    enabled = enabled and total != 0
    if enabled:
        options = {**_terminal_size(), **options}
    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, leave=False,
                **options)


def _terminal_size() -> dict[str, int]:
    """The size of the terminal on stderr, 80×24 where it says 0×0 (a pseudo-terminal
    nobody sized), in which tqdm would draw nothing; empty: tqdm finds out."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return {}
    return {"ncols": size.columns or 80, "nrows": size.lines or 24}


def finish(bar: tqdm[Any]) -> None:
    """Close ``bar``. One that reached its total stays, on a line of its own, unless
    it was drawn below another (a method's forwards during a batch); one stopped
    before its total (an interrupted run) is erased."""
    complete = bar.total is None or bar.n >= bar.total
    bar.leave = None if complete else False      # None: stay when on the first line
    bar.close()

"""What a person watching a run sees: our own log lines, a progress bar per stage on a
terminal, and Ray's logging only when asked for (``-v``).

Three levels, set once by the CLI (the Python API keeps the default):
  quiet    warnings and the final summary only; no bars
  normal   our lines; on a terminal also progress bars (tqdm, on stderr, the lines
           scrolling above them); Ray's INFO logging, its workers' forwarded output and
           its Ray Data execution banners off
  verbose  all of Ray's logging as well

Ray is quietened through its own settings (``ray.init``'s ``logging_level`` and
``log_to_driver``, the level of Ray's console handlers, ``DataContext``), never by
filtering text: a warning or an error from Ray still shows.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("pseudolabel")

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL

# Loggers Ray configures with console handlers of their own.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def configure(quiet: bool = False, verbose: bool = False) -> None:
    global _level
    _level = VERBOSE if verbose else QUIET if quiet else NORMAL
    log.setLevel(logging.WARNING if _level == QUIET else logging.INFO)


def verbose() -> bool:
    return _level == VERBOSE


def bars() -> bool:
    """Progress bars: on a terminal (stderr, where tqdm draws), unless -q."""
    return _level != QUIET and sys.stderr.isatty()


# Ray's notice that a new local instance has token authentication on, as it should:
# nothing for a user to do (the opposite notice, auth off, is one they chose).
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def ray_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments: the workers' own output (Ray's per-actor banners, faiss
    and Ray Data worker logs) reaches the console only with -v. Errors still do: a
    failed task or a dead actor comes back to the driver as an exception."""
    if not verbose():
        logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    return {
        "logging_level": logging.INFO if verbose() else logging.WARNING,
        "log_to_driver": verbose(),
    }


def quiet_ray() -> None:
    """Ray's console output at WARNING unless -v; Ray Data's progress bars on a terminal
    (in a job log, where they are a block of INFO lines every few seconds, only with -v)
    and its execution banners only with -v."""
    import ray.data

    level = logging.INFO if verbose() else logging.WARNING
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # Console handlers only: Ray's log files keep everything.
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(level)
    ctx = ray.data.DataContext.get_current()
    # Its bars stay on: on a terminal they are tqdm's, off one Ray Data logs them at INFO,
    # which the console shows only with -v (turning them off makes Ray warn instead).
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = verbose()


class _Bar:
    """tqdm's bar, or nothing: ``update`` and ``set`` cost nothing off a terminal."""

    def __init__(self, bar: Any | None):
        self._bar = bar

    def update(self, n: float = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def set(self, value: float, **postfix: Any) -> None:
        if self._bar is not None:
            self.update(value - self._bar.n, **postfix)

    def reach(self, value: float) -> None:
        """Move to ``value`` unless already past it (counted by other means meanwhile)."""
        if self._bar is not None and value > self._bar.n:
            self.update(value - self._bar.n)


@contextmanager
def bar(total: float | None, desc: str, unit: str = "it") -> Iterator[_Bar]:
    """A progress bar for one stage, removed when the stage ends; our log lines print
    above it while it runs."""
    if not bars():
        yield _Bar(None)
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with (
        logging_redirect_tqdm(loggers=[log]),
        tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True) as t,
    ):
        yield _Bar(t)

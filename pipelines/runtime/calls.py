"""Actors, tasks and results on Ray when a Ray session is up, else in this process.

The in-process backend (``--backend local``) runs the stages of a run on Ray unchanged:
its actors are plain objects whose methods run when called, and a call's result is a
``Done`` holding the value or the exception, which ``get`` returns or raises as
``ray.get`` would. ``start`` and ``task`` make an actor or a task of the backend in use;
``get``, ``wait`` and ``put`` take the results of either. The driver's side of every
worker pool goes through here, so it is one code for both backends.

In this process a call runs when it is made, so ``wait`` finds every result ready and
the timeouts that bound a cluster's answers never start; a stage's progress bar moves
as the worker's own loops report (``reporting``, ``progressed``), not as calls return.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

# Set by ``in_process`` while a run of --backend local is under way in this thread (a
# context variable: a run on Ray in another thread of the process is not affected).
_in_process = contextvars.ContextVar("pseudolabel_in_process", default=False)


@contextmanager
def in_process() -> Iterator[None]:
    """Within it, actors and tasks run in this process, even where a Ray session is up
    (``--backend local`` from a notebook that uses Ray)."""
    token = _in_process.set(True)
    try:
        yield
    finally:
        _in_process.reset(token)


# The update of the progress bar of the stage under way, while an in-process worker's
# calls run: ``reporting``. Never set in a Ray worker, where ``progressed`` does nothing.
_progress: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "pseudolabel_progress", default=None
)


@contextmanager
def reporting(update: Callable[[int], None]) -> Iterator[None]:
    """Within it, an in-process worker's ``progressed(n)`` calls ``update(n)``: a call
    made here runs at once, so the bar would otherwise jump from empty to full."""
    token = _progress.set(update)
    try:
        yield
    finally:
        _progress.reset(token)


def progressed(units: int) -> None:
    """A worker's loop has done ``units`` more rows: an in-process run's bar moves (on
    Ray the driver moves its bar as the calls return)."""
    update = _progress.get()
    if update is not None:
        update(units)


def on_ray() -> bool:
    """True inside a Ray session (the driver of a run on Ray, or one of its actors),
    outside ``in_process``."""
    return not _in_process.get() and ray.is_initialized()


class Done:
    """A finished in-process call: its value, or the exception it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _resolved(value: Any) -> Any:
    # As Ray passes an ObjectRef argument as its value (top-level arguments only).
    return value.result() if isinstance(value, Done) else value


class LocalCall:
    """``fn`` called as a Ray task or actor method is: ``.remote(*args)`` runs it now and
    returns ``Done``; ``.options(num_returns=n)`` splits its tuple into n of them."""

    def __init__(self, fn: Callable, num_returns: int = 1):
        self.fn, self.num_returns = fn, num_returns

    def options(self, num_returns: int = 1, **_ignored: Any) -> LocalCall:
        return LocalCall(self.fn, num_returns)

    def remote(self, *args: Any, **kwargs: Any) -> Done | list[Done]:
        try:
            args = tuple(_resolved(a) for a in args)
            kwargs = {name: _resolved(a) for name, a in kwargs.items()}
            value = self.fn(*args, **kwargs)
        except Exception as e:  # raised by get, as Ray raises a task's error
            return [Done(error=e)] * self.num_returns if self.num_returns > 1 else Done(error=e)
        if self.num_returns > 1:
            return [Done(v) for v in value]
        return Done(value)


class LocalActor:
    """An instance of ``cls`` in this process, called as a Ray actor is."""

    def __init__(self, cls: type, *args: Any):
        self.instance = cls(*(_resolved(a) for a in args))

    def __getattr__(self, name: str) -> LocalCall:
        return LocalCall(getattr(self.instance, name))


def start(cls: type, options: dict[str, Any], *args: Any) -> Any:
    """An actor of ``cls``: on Ray with ``options`` (``ray.remote``'s), else in this
    process, where ``cls(*args)`` runs now (its exceptions are raised here)."""
    if on_ray():
        return ray.remote(cls).options(**options).remote(*args)
    return LocalActor(cls, *args)


def task(remote_function: Any) -> Any:
    """A ``@ray.remote`` function, or its Python function called in this process."""
    return remote_function if on_ray() else LocalCall(remote_function._function)


def put(value: Any) -> Any:
    """``ray.put``: a ref to pass to many calls."""
    return ray.put(value) if on_ray() else Done(value)


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` of a ref or a list of refs, of either backend."""
    if isinstance(refs, Done):
        return refs.result()
    if isinstance(refs, list) and all(isinstance(r, Done) for r in refs):
        return [r.result() for r in refs]
    return ray.get(refs, timeout=timeout)


def wait(
    refs: list, num_returns: int = 1, timeout: float | None = None, fetch_local: bool = True
) -> tuple[list, list]:
    """``ray.wait``: (ready, pending). In-process results are all ready."""
    if all(isinstance(r, Done) for r in refs):
        return list(refs[:num_returns]), list(refs[num_returns:])
    return ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)


def kill(actor: Any) -> None:
    """``ray.kill``; an in-process actor is dropped with its last reference."""
    if not isinstance(actor, LocalActor):
        ray.kill(actor)

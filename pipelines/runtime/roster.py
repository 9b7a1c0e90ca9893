"""Who did a pass's work: each actor of a pool reports itself once it is built.

Ray Data starts the label pass's actors itself, so the driver cannot ask them; they
report here instead. The manifest records one entry per actor (node, device), which is
how a run shows that it got the pool it asked for (an autoscaling GPU pool can stay at
one actor, ray#59144) and which workers fell back to the CPU. O(actors), never rows.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("pseudolabel")

LOCAL_NODE = "local"  # the node of an in-process actor (``calls.LocalActor``)


class Roster:
    def __init__(self) -> None:
        self._members: dict[str, dict[str, Any]] = {}

    def join(self, member: dict[str, Any]) -> None:
        """Record ``member`` (keyed by its actor id: a restarted actor replaces itself)."""
        self._members[member["actor"]] = dict(member)

    def members(self) -> list[dict[str, Any]]:
        return [self._members[key] for key in sorted(self._members)]


def start_roster() -> Any:
    """A ``Roster`` actor on the driver's node (``runtime.bookkeeping``)."""
    from pseudolabel.pipelines.runtime.bookkeeping import start_bookkeeper

    return start_bookkeeper(Roster, "roster")


def join_roster(roster: Any, device: str) -> None:
    """Report the calling actor (its id, node, pid and ``device``) to ``roster`` (an
    actor handle or name, or None outside a run), waiting for the answer."""
    if roster is None:
        return
    import ray

    from pseudolabel.pipelines.runtime import calls
    from pseudolabel.pipelines.runtime.bookkeeping import resolve

    member = {"actor": f"pid-{os.getpid()}", "node": LOCAL_NODE, "pid": os.getpid()}
    if calls.on_ray():
        context = ray.get_runtime_context()
        member.update(actor=context.get_actor_id() or member["actor"], node=context.get_node_id())
    calls.get(resolve(roster).join.remote({**member, "device": device}))


def describe(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's view of a pool: how many actors, on how many nodes, on what."""
    return {
        "actors": len(members),
        "nodes": len({m["node"] for m in members}),
        "devices": [m["device"] for m in members],
    }


def warn_fallback(stage: str, requested: str, members: list[dict[str, Any]]) -> None:
    """One driver-side warning when actors asked for ``requested`` computed elsewhere."""
    fell_back = [m for m in members if m["device"] != requested]
    if fell_back:
        log.warning(
            "%s: %d of %d workers were placed for a GPU but see no CUDA device, so they "
            "compute on the CPU (check the nodes' drivers and image); the manifest lists "
            "each worker's device",
            stage,
            len(fell_back),
            len(members),
        )

"""The run's bookkeeping actors (the skip ledger, the roster): small, on the driver's
node, and passed to other actors by name.

On the driver's node: a node the autoscaler may remove must not take the run's books
with it. By name: an actor handle among the constructor arguments of an actor that Ray
may rebuild is kept in the object store, and Ray logs an error for every such actor
(ray#53727); a name is looked up when the actor starts, and again when it is rebuilt.
"""

from __future__ import annotations

import uuid
from typing import Any

# The names of the bookkeeping actors this process started, by actor id.
_NAMES: dict[str, str] = {}


def start_bookkeeper(cls: type, prefix: str) -> Any:
    """A named ``cls`` actor with no CPU of its own, on this (the driver's) node, never
    restarted: a lost one fails the run's checks rather than undercounting. Outside Ray,
    an in-process one (``calls.LocalActor``)."""
    import ray

    from pseudolabel.pipelines.runtime import calls

    if not calls.on_ray():
        return calls.LocalActor(cls)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    name = f"pseudolabel-{prefix}-{uuid.uuid4().hex}"
    options = {"num_cpus": 0, "max_restarts": 0, "scheduling_strategy": here, "name": name}
    handle = ray.remote(**options)(cls).remote()
    _NAMES[handle._actor_id.hex()] = name
    return handle


def as_argument(actor: Any) -> Any:
    """What to give another actor for ``actor``: its name when this process started it,
    anything else (None, a plain object, a name) as it is."""
    actor_id = getattr(actor, "_actor_id", None)
    return _NAMES.get(actor_id.hex(), actor) if actor_id is not None else actor


def resolve(actor: Any) -> Any:
    """The handle of ``actor``, given by name or by handle."""
    if isinstance(actor, str):
        import ray

        return ray.get_actor(actor)
    return actor

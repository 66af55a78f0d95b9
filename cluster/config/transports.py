"""The transport registry: every way tokens can travel between a frontend and its expert workers, in one table.

The config's allowed values and its validation messages (:class:`~cluster.config.parallel.ParallelConfig`), the
Serve application's check, the frontend actor's extra methods and the construction of the client
(``cluster.runtime.transports``) all read this table. Adding a transport is one module in ``router/`` (a subclass
of ``router.transport.RemoteTransport``) plus one row here::

    TransportSpec(
        name="mytransport",
        client="router.my_transport:MyTransport",
        summary="what it moves tokens over",
        copies=False, why_no_copies="why a failed layer cannot be sent to another copy",
        serve=True,
    )

No torch and no Ray here: classes are named as ``"module:Class"`` and imported only when a client is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransportSpec:
    """One row of the registry.

    name           the value of ``transport`` (config field, ``--transport``, Serve arg)
    client         ``"module:Class"`` of the transport (``router.transport.RemoteTransport``), built with the
                   shared constructor ``(handles, *, timeout_s, overlap_min_batch)``
    summary        one line for the help text
    copies         copies of experts work with it: a worker that fails a layer is left out and the layer is sent
                   again to the other copies within the step (``expert_replicas`` > 1)
    why_no_copies  why not, when ``copies`` is False (the validation message says it)
    host_hooks     ``"module:Class"`` of a mixin the actor that drives the client must include (its methods are
                   actor tasks the transport calls on its own host), or None
    serve          the Serve frontend deployment may use it
    why_not_serve  why not, when ``serve`` is False
    keeps_frontend a worker's death leaves the frontend running (Ray restarts the worker; the transport reconnects);
                   False: Ray stops the frontend's actor too, so the offline API replaces it (and its pool) before
                   the next request
    shared_pool    several frontends may drive the same workers at once (one expert pool for many frontends)
    why_not_shared why not, when ``shared_pool`` is False
    """

    name: str
    client: str
    summary: str
    copies: bool
    why_no_copies: str = ""
    host_hooks: str | None = None
    serve: bool = True
    why_not_serve: str = ""
    keeps_frontend: bool = True
    shared_pool: bool = False
    why_not_shared: str = ""


_RDT_NOT_SERVE = (
    "RDT transfers are tasks on the frontend's own actor (its host hooks), and a Serve replica is an actor Ray Serve "
    "creates, without tensor transport or those methods; use it through the offline LLM API"
)

REGISTRY: tuple[TransportSpec, ...] = (
    TransportSpec(
        name="object_ref",
        client="router.object_ref:ObjectRefTransport",
        summary="ordinary Ray actor calls (the general fallback; copies of experts; one pool for many frontends)",
        copies=True,
        shared_pool=True,
    ),
    TransportSpec(
        name="channel",
        client="router.channel:ChannelTransport",
        summary="Ray Compiled Graph shared-memory channels wired once per frontend",
        copies=False,
        why_no_copies="a compiled graph sends every layer to every worker of the graph and cannot leave out a dead one",
        why_not_shared="a compiled graph has one driver, and an actor serves one compiled graph at a time",
    ),
    TransportSpec(
        name="gloo",
        client="router.rdt:GlooTransport",
        summary="Ray Direct Transport over a gloo collective group (CPU)",
        copies=False,
        why_no_copies="Ray stops both ends of a failed RDT transfer, so there is no live group to fail over in",
        host_hooks="router.rdt:RdtHostHooks",
        serve=False,
        why_not_serve=_RDT_NOT_SERVE,
        keeps_frontend=False,
        why_not_shared="an RDT group is one frontend's, and Ray stops both ends of a failed transfer",
    ),
    TransportSpec(
        name="nccl",
        client="router.rdt:NcclTransport",
        summary="Ray Direct Transport over an NCCL collective group (GPU workers)",
        copies=False,
        why_no_copies="Ray stops both ends of a failed RDT transfer, so there is no live group to fail over in",
        host_hooks="router.rdt:RdtHostHooks",
        serve=False,
        why_not_serve=_RDT_NOT_SERVE,
        keeps_frontend=False,
        why_not_shared="an RDT group is one frontend's, and Ray stops both ends of a failed transfer",
    ),
)

TRANSPORTS: dict[str, TransportSpec] = {spec.name: spec for spec in REGISTRY}
NAMES: tuple[str, ...] = tuple(TRANSPORTS)
SERVE_NAMES: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.serve)


def spec_of(name: str) -> TransportSpec:
    """The row of ``name``; a ValueError listing the known ones when there is none."""
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; one of {', '.join(NAMES)}") from None

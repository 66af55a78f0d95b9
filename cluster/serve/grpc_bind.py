"""Make Ray Serve's gRPC proxy listen on one host instead of every interface.

Ray 2.60's gRPC proxy takes no host: ``ray.serve._private.grpc_util.start_grpc_server`` binds ``[::]:<port>``
through ``ray.serve._private.default_impl.add_grpc_address``. :func:`bind_grpc_host` runs in each Ray worker
process as the job's ``worker_process_setup_hook`` (the Serve controller and its proxies inherit the job's runtime
environment). When ``$MIXSERVE_GRPC_HOST`` is set it arranges for that helper to be replaced as soon as the
process imports it, so the proxy binds ``$MIXSERVE_GRPC_HOST:<port>``; processes that never import Serve's internals
(expert workers) pay nothing. With the variable unset, or a Ray without that helper, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

GRPC_HOST_ENV = "MIXSERVE_GRPC_HOST"
HOOK = "cluster.serve.grpc_bind.bind_grpc_host"
TARGET = "ray.serve._private.default_impl"


def grpc_address(host: str, address: str) -> str:
    """``[::]:9000`` with host 127.0.0.1 -> ``127.0.0.1:9000``; an IPv6 host gets brackets (``[::1]:9000``)."""
    port = address.rsplit(":", 1)[1]
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def patch(module: ModuleType, host: str) -> bool:
    """Replace ``module.add_grpc_address`` so it binds ``host``; False when the module has no such helper."""
    original = getattr(module, "add_grpc_address", None)
    if original is None:
        return False
    if getattr(original, "mixserve_host", None) != host:

        def add_grpc_address(server: Any, address: str) -> None:
            original(server, grpc_address(host, address))

        add_grpc_address.mixserve_host = host  # type: ignore[attr-defined]
        module.add_grpc_address = add_grpc_address  # type: ignore[attr-defined]
    return True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds :data:`TARGET` with the other finders, then patches it right after it is executed."""

    def __init__(self, host: str) -> None:
        self.host = host

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one module, once: the real finders locate it
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, host = loader.exec_module, self.host

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module, host)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def bind_grpc_host() -> None:
    """Ray worker setup hook: with ``$MIXSERVE_GRPC_HOST`` set, Serve's gRPC proxy in this process binds that host."""
    host = os.environ.get(GRPC_HOST_ENV)
    if not host:
        return
    module = sys.modules.get(TARGET)
    if module is not None:
        patch(module, host)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(host))

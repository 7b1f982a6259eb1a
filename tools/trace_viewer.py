"""Runs Arize Phoenix, the local trace viewer of `make traces`, with both of
its OTLP receivers on 127.0.0.1 only.

Phoenix binds its UI and OTLP/HTTP receiver to PHOENIX_HOST, but its
OTLP/gRPC receiver to every interface (`[::]`, hard-coded in 20.x): on a
shared machine that would take spans from anyone. This wraps gRPC's server
so that address becomes the loopback one, then starts Phoenix as its own
`phoenix` command does. Run it with the Python of Phoenix's venv, not the
router's (Phoenix is an optional tool, not a dependency of dprouter).
"""

from __future__ import annotations

import sys
from typing import Any

import grpc.aio
from phoenix.server.main import main

_new_server = grpc.aio.server


def _loopback_server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
    server = _new_server(*args, **kwargs)
    bind = server.add_insecure_port

    def add_insecure_port(address: str) -> int:
        return bind(address.replace("[::]", "127.0.0.1"))

    server.add_insecure_port = add_insecure_port  # type: ignore[method-assign]
    return server


if __name__ == "__main__":
    grpc.aio.server = _loopback_server
    sys.argv = ["phoenix", "serve", *sys.argv[1:]]
    sys.exit(main())

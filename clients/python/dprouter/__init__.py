"""dprouter's Python SDK: `Client` (blocking) and `dprouter.aio.AsyncClient`
over the stubs in `dprouter.v1`, generated from protos/ by `make stubs` (not
committed), and the `dprouter` command (`dprouter.cli`)."""

from dprouter.calls import Route
from dprouter.client import Client, Stream

__all__ = ["Client", "Route", "Stream"]

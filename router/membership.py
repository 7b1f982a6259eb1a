"""How ranks join the router, and how an independent rank joins again.

Creating a vLLM engine client blocks until its ranks have done their
handshake, so every client is made in a daemon thread (a rank that never
joins must not keep the router alive); then its ranks are warmed up before
they serve. With the coupled topology one client
joins all ranks at once. With independent ranks each rank has its own client
on its own port (the base `--data-parallel-rpc-port` + the rank): the router
serves as soon as one rank has joined, and a rank that failed is given a new
client, which waits for the rank server to come back (vLLM's old client for
a restarted engine stays stuck: measured). So is a rank whose join failed (a
rank server started with the wrong flags, or killed in its handshake), once
the router serves or another rank is still joining.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from router.config import RouterConfig
from router.dispatcher import Dispatcher
from router.fleet import Fleet
from router.fleet import build as build_fleet
from router.health import RouterHealth
from router.ranks import CoupledRanks, IndependentRanks, RankPool
from router.topology import rank_port
from router.vllm_compat import EngineClient, rank_group_args

log = logging.getLogger("dprouter")
T = TypeVar("T")
# After a rank's join fails: long enough for its port to be free again.
JOIN_RETRY_S = 1.0


async def start_client(engine_args: argparse.Namespace) -> EngineClient:
    """A client whose ranks have joined and been warmed up (`EngineClient.warm_up`)."""
    client = await in_daemon_thread(lambda: EngineClient.start(engine_args))
    try:
        await client.warm_up()
    except BaseException:
        client.shutdown()
        raise
    return client


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Runs a blocking call off the event loop in a thread that never keeps the
    process alive."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.cancelled():  # else the router stopped waiting
            outcome()

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_exception, e))
        else:
            loop.call_soon_threadsafe(settle, functools.partial(future.set_result, result))

    threading.Thread(target=run, name="join-ranks", daemon=True).start()
    return future


class Membership:
    def __init__(self, config: RouterConfig, dispatcher: Dispatcher, health: RouterHealth) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._health = health
        self._ranks = config.data_parallel_size
        self._joining: dict[int, asyncio.Future[EngineClient]] = {}
        self._updates: set[asyncio.Future[None]] = set()
        self._closed = False  # a join retried after `close` does not start
        self._fleet: Fleet | None = None  # once the first rank joined
        self.first_join: asyncio.Future[Fleet] = asyncio.get_running_loop().create_future()

    @property
    def independent(self) -> bool:
        return self._config.topology == "independent"

    def start(self) -> None:
        """Starts every rank's join; `first_join` resolves when the router can serve."""
        if self.independent:
            for rank in range(self._ranks):
                self._join(rank)
        else:
            joining = asyncio.ensure_future(start_client(self._config.engine_args))
            joining.add_done_callback(self._coupled_joined)

    def _coupled_joined(self, joining: asyncio.Future[EngineClient]) -> None:
        if joining.cancelled():  # the router is stopping
            return
        if (error := joining.exception()) is not None:
            self.first_join.set_exception(error)
            return
        pool = CoupledRanks(joining.result())
        self._attach(pool)
        _freeze_heap()

    def _attach(self, pool: RankPool, healthy: bool = True) -> Fleet:
        config = self._config
        fleet = self._fleet = build_fleet(
            pool, config.routing_policy, config.load_factor, config.max_queue_per_rank,
            config.max_in_flight, config.limits, healthy,
        )  # fmt: skip
        self._dispatcher.attach(fleet)
        log.info("serving", extra={"ranks": self._ranks, "routing_policy": fleet.policy.name})
        self.first_join.set_result(fleet)
        return fleet

    def _join(self, rank: int) -> None:
        if rank in self._joining or self._closed:  # a retry and a replacement can meet
            return
        port = rank_port(self._config.engine_args.data_parallel_rpc_port, rank)
        args = rank_group_args(self._config.engine_args, port)
        log.info("waiting for a rank to join", extra={"rank": rank, "port": port})
        joining = asyncio.ensure_future(start_client(args))
        self._joining[rank] = joining
        joining.add_done_callback(lambda done: self._joined(rank, done))

    def _joined(self, rank: int, joining: asyncio.Future[EngineClient]) -> None:
        self._joining.pop(rank, None)
        if joining.cancelled():  # the router is stopping
            return
        if (error := joining.exception()) is not None:
            if not self.first_join.done() and not self._joining:
                log.error("rank could not join", extra={"rank": rank}, exc_info=error)
                self.first_join.set_exception(error)  # no rank to serve with: the router exits
                return
            # A rank server that started wrong (or died in its handshake) is
            # waited for again: the operator restarts it, it joins.
            log.error(
                "rank could not join; waiting for it again",
                extra={"rank": rank, "retry_s": JOIN_RETRY_S},
                exc_info=error,
            )
            asyncio.get_running_loop().call_later(JOIN_RETRY_S, self._join, rank)
            return
        client = joining.result()
        fleet = self._fleet
        if fleet is None:
            pool = IndependentRanks(self._ranks, rank, client)
            fleet = self._attach(pool, healthy=False)
        else:
            self._independent_pool(fleet).join(rank, client)
        fleet.ledger.set_healthy(rank, True)
        log.info("rank joined", extra={"rank": rank})
        _freeze_heap()
        update = asyncio.ensure_future(self._health.update(fleet.loads()))
        self._updates.add(update)  # keep a reference until it is done
        update.add_done_callback(self._updates.discard)

    def replace(self, rank: int) -> bool:
        """Gives a failed independent rank a new engine client that waits for
        the rank server to join again; False where that cannot be done."""
        if self._fleet is None or rank in self._joining:
            return False
        pool = self._fleet.pool
        if not isinstance(pool, IndependentRanks):
            return False
        old = pool.leave(rank)
        if old is not None:
            old.shutdown()
        self._join(rank)
        return True

    def close(self) -> None:
        self._closed = True
        if self._fleet is not None:
            self._fleet.pool.close()

    @staticmethod
    def _independent_pool(fleet: Fleet) -> IndependentRanks:
        pool = fleet.pool
        if not isinstance(pool, IndependentRanks):
            raise TypeError("a rank joined alone, but the ranks are coupled")
        return pool


def _freeze_heap() -> None:
    """Puts what the process holds now out of the garbage collector's reach,
    as vLLM's own API server does after start-up. An engine client (vLLM,
    torch, the tokenizer: ~700k objects) lives as long as its rank; left in
    reach, every full collection scanned it, stalling the event loop for a
    second or more under load. A client replaced later is still freed by
    reference counting, all but what of it sits in reference cycles."""
    gc.collect()
    gc.freeze()

"""The `dprouter` command, for people at a terminal.

    dprouter generate "The capital of France is" --max-tokens 32
    dprouter generate --chat "What is the capital of France?" --session u42
    dprouter generate "The capital of France is" --token-ids
    dprouter health [--watch]
    dprouter ranks [drain N | resume N]

The address comes from --address, else $DPROUTER_ADDRESS, else 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence

import grpc

from dprouter.aio import AsyncClient
from dprouter.calls import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, RequestOptions
from dprouter.v1 import generate_pb2, ranks_pb2

# Health names that are there whatever the number of ranks.
ROUTER_HEALTH_NAMES = ["", "dprouter.v1.GenerateService"]


def sampling_params(args: argparse.Namespace) -> generate_pb2.SamplingParams:
    """Only the flags given: the router applies vLLM's defaults to the rest."""
    sampling = generate_pb2.SamplingParams(
        stop=args.stop, ignore_eos=args.ignore_eos, max_tokens=args.max_tokens
    )
    for field in ("temperature", "top_p", "top_k", "min_p", "seed", "min_tokens"):
        if (value := getattr(args, field)) is not None:
            setattr(sampling, field, value)
    if args.token_ids:
        sampling.detokenize = False
    return sampling


async def generate(client: AsyncClient, args: argparse.Namespace) -> int:
    prompt: str | list[generate_pb2.ChatMessage] = args.prompt
    if args.chat:
        prompt = [generate_pb2.ChatMessage(role="user", content=args.prompt)]
        if args.system:
            prompt.insert(0, generate_pb2.ChatMessage(role="system", content=args.system))
    options = RequestOptions(sampling=sampling_params(args))
    if args.rank is not None:
        options["rank"] = args.rank
    if args.session:
        options["session"] = args.session
    stream = client.generate(prompt, **options)
    last = generate_pb2.GenerateResponse()
    printed = False
    try:
        async for last in stream:
            piece = last.text
            if args.token_ids and last.token_ids:
                piece = (" " if printed else "") + " ".join(map(str, last.token_ids))
            print(piece, end="", flush=True)
            printed |= bool(piece)
    except grpc.aio.AioRpcError:
        if printed:
            print()  # ends the text's line before the error's
        raise
    print()
    route = await stream.route()
    reason = generate_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    # The details go to stderr, so that stdout is the generated text alone.
    print(
        f"[rank {route.rank} ({route.policy}: {route.reason}), {reason.lower()}, "
        f"{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} tokens, "
        f"request {route.request_id}]",
        file=sys.stderr,
    )
    return 0


async def health_names(client: AsyncClient) -> list[str]:
    ranks = await client.ranks()
    return [*ROUTER_HEALTH_NAMES, *(f"rank/{r.rank}" for r in ranks)]


def label(name: str) -> str:
    return name or "router"


async def health(client: AsyncClient, args: argparse.Namespace) -> int:
    names = await health_names(client)
    if args.watch:
        return await watch_health(client, names)
    statuses = [await client.health(name) for name in names]
    for name, status in zip(names, statuses, strict=True):
        print(f"{label(name):<30} {status}")
    return 0 if statuses[0] == "SERVING" else 1


async def watch_health(client: AsyncClient, names: Sequence[str]) -> int:
    """One line per status change of any name, until Ctrl-C."""

    async def watch(name: str) -> None:
        async for status in client.watch_health(name):
            print(f"{time.strftime('%H:%M:%S')} {label(name):<30} {status}", flush=True)

    # The first error (the router went away) ends the command.
    await asyncio.gather(*(watch(name) for name in names))
    return 0


RANK_COLUMNS = (
    "rank state     in_flight waiting running kv_cache queued_tokens served failed cancelled"
)


def rank_row(rank: ranks_pb2.RankStatus) -> str:
    state = ranks_pb2.RankState.Name(rank.state).removeprefix("RANK_STATE_").lower()
    return (
        f"{rank.rank:<4} {state:<9} {rank.in_flight:>9} {rank.waiting:>7} {rank.running:>7} "
        f"{rank.kv_cache_usage:>8.1%} {rank.queued_prompt_tokens:>13} {rank.served:>6} "
        f"{rank.failed:>6} {rank.cancelled:>9}"
    )


async def ranks(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.action == "drain":
        rows = [await client.drain(args.rank)]
    elif args.action == "resume":
        rows = [await client.resume(args.rank)]
    else:
        rows = await client.ranks()
    print(RANK_COLUMNS)
    for row in rows:
        print(rank_row(row))
    return 0


COMMANDS = {"generate": generate, "health": health, "ranks": ranks}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=os.environ.get("DPROUTER_ADDRESS", DEFAULT_ADDRESS),
        help="the router's HOST:PORT (default $DPROUTER_ADDRESS or %(default)s)",
    )
    common.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds"
    )
    parser = argparse.ArgumentParser(prog="dprouter", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", parents=[common], help="stream a completion")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    gen.add_argument("--system", help="a system message before the prompt (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=64, help="default %(default)s")
    gen.add_argument("--min-tokens", type=int)
    gen.add_argument("--temperature", type=float, help="0 is greedy (the engine's default 1)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument(
        "--token-ids", action="store_true", help="print token ids, not text (nothing is decoded)"
    )
    gen.add_argument("--rank", type=int, help="pin a data-parallel rank")
    gen.add_argument("--session", help="session key for affinity routing")

    check = commands.add_parser("health", parents=[common], help="the router's and each rank's")
    check.add_argument("--watch", action="store_true", help="print every change until Ctrl-C")

    table = commands.add_parser("ranks", parents=[common], help="the load table; drain, resume")
    table.add_argument("action", nargs="?", choices=["drain", "resume"])
    table.add_argument("rank", nargs="?", type=int)
    args = parser.parse_args(argv)
    if args.command == "generate" and args.system is not None and not args.chat:
        gen.error("--system goes with --chat: dprouter generate --chat PROMPT --system TEXT")
    if args.command == "ranks" and (args.action is None) != (args.rank is None):
        table.error("drain and resume take a rank: dprouter ranks drain 1")
    return args


async def run(args: argparse.Namespace) -> int:
    async with AsyncClient(args.address, timeout=args.timeout) as client:
        try:
            return await COMMANDS[args.command](client, args)
        except grpc.aio.AioRpcError as error:
            # The router answers UNAVAILABLE itself over a connected channel
            # (ranks not joined yet, shutting down); not connected means nothing listens.
            if error.code() == grpc.StatusCode.UNAVAILABLE and (
                client.channel.get_state() != grpc.ChannelConnectivity.READY
            ):
                print(
                    f"dprouter: cannot reach the router at {args.address}: is it running? "
                    "(make run)",
                    file=sys.stderr,
                )
            else:
                print(f"dprouter: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return asyncio.run(run(parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

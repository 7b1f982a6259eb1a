"""The load process: one system's driver, kept open across runs.

    python -m bench.load dprouter 127.0.0.1:50051 --pin 0 --results-fd 5
    python -m bench.load inprocess - -- --model DIR --dtype float32 ...

Reads one command a line on stdin, `{"concurrency": C, "requests": [[prompt,
max_tokens], ...]}`, runs it in a closed loop and writes the `Run` as one
JSON line to --results-fd (vLLM logs to stdout). A separate process, so the
load can be pinned to a core apart from the front end it measures (seen here:
a load client that floats onto the front end's core starves it), and so the
in-process floor can hold its engine for the whole benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from bench.clients import DprouterGrpc, Driver, VllmGrpc, VllmHttp, closed_loop
from bench.workload import Request

SYSTEMS = ("dprouter", "dprouter-ids", "vllm-grpc", "vllm-http", "inprocess")


async def open_driver(system: str, target: str, model: str, engine_argv: list[str]) -> Driver:
    if system in ("dprouter", "dprouter-ids"):
        return DprouterGrpc(target, detokenize=system == "dprouter")
    if system == "vllm-grpc":
        return VllmGrpc(target)
    if system == "vllm-http":
        return VllmHttp(target, model)
    from bench.inprocess import InProcess  # only this driver imports vLLM

    return await InProcess.start(engine_argv)


async def serve(args: argparse.Namespace, results: int) -> None:
    driver = await open_driver(args.system, args.target, args.model, args.engine_args)
    loop = asyncio.get_running_loop()
    try:
        os.write(results, b'{"ready": true}\n')
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            requests = [Request(prompt, max_tokens) for prompt, max_tokens in command["requests"]]
            run = await closed_loop(driver, requests, command["concurrency"])
            os.write(results, json.dumps(run.to_json()).encode() + b"\n")
    finally:
        await driver.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("target", help="host:port, an http:// URL, or - (inprocess)")
    parser.add_argument("--model", default="", help="the model name (vllm-http)")
    parser.add_argument("--pin", type=int, help="run on this core alone")
    parser.add_argument("--results-fd", type=int, default=1)
    parser.add_argument("engine_args", nargs="*", help="after --: engine flags (inprocess)")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    asyncio.run(serve(args, args.results_fd))


if __name__ == "__main__":
    main()

"""dprouter against vLLM's own servers and the in-process floor.

    python -m bench.compare            # tiny + default model, concurrency 1 8 32 64
    python -m bench.compare --quick    # smoke test: tiny model, concurrency 1 and 8

Per model, every system is started once (dprouter: rank servers + router;
vLLM's HTTP and gRPC servers; the engine in-process in its load process)
and they take turns on the same requests: each round draws fresh prompts per
concurrency, and the order of the systems rotates between rounds, so a noisy
neighbour hurts them alike. With --apart each system runs alone instead,
started, measured and stopped before the next (the systems that drive its
server with it): on a GPU, each engine gets vLLM's default memory share.
The load processes are pinned to cores of their own (a load client that
floats onto the front end's core starves it). Also measured: dprouter's
overhead over the floor, 1 rank against 2, the streaming ceiling of one
router process with an engine stand-in, and the routing decision cost. Writes
bench/results/<date>.md and a PNG per model, and prints the markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil

from bench import report, systems
from bench.drive import PYTHON_LOAD, LoadGroup, LoadProcess, load_group
from bench.report import Results
from bench.routing import cost_table
from bench.workload import Shape, requests
from tools.local_cluster import free_port, stop_group
from tools.platforms import detect

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "tiny": ROOT / "models" / "tiny-llama",
    "smollm2": ROOT / "models" / "smollm2-135m-instruct",
}
SYSTEMS, FLOOR, SCALED = systems.SYSTEMS, systems.FLOOR, systems.SCALED
CEILING = "dprouter over a stand-in engine"
# The load processes, each against a stand-in of its own.
GENERATOR = "load generator"


def vocab_size(model: Path) -> int:
    size: int = json.loads((model / "config.json").read_text())["vocab_size"]
    return size


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, "
        f"Python {platform.python_version()}"
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.notes: list[str] = []
        self.logs = Path(args.logs)

    def deployment(self, model: Path, ranks: int) -> systems.Deployment:
        args = self.args
        return systems.Deployment(
            str(model), ranks, args.max_model_len, self.logs, detect(args.platform),
            tuple(shlex.split(args.engine_flags)),
        )  # fmt: skip

    def requests_per_run(self, concurrency: int) -> int:
        count: int = max(self.args.min_requests, self.args.requests_per_stream * concurrency)
        return count

    def offline(self, model: Path) -> str:
        """vLLM alone on the top concurrency's workload (bench/offline.py)."""
        args = self.args
        count = self.requests_per_run(max(args.concurrency))
        deployment = self.deployment(model, 1)
        result = self.logs / "offline.json"
        result.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "bench.offline", "--count", str(count), "--seed", str(args.seed),
            "--vocab-size", str(vocab_size(model)), "--out", str(result),
            "--prompt-tokens", *map(str, args.prompt_tokens),
            "--output-tokens", *map(str, args.output_tokens),
            "--", *deployment.engine_flags(),
        ]  # fmt: skip
        log = self.logs / "offline.log"
        with open(log, "wb") as out:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **deployment.engine_env()}, check=False,
            )  # fmt: skip
        if done.returncode != 0 or not result.exists():
            self.notes.append(f"vLLM offline could not run: exit {done.returncode} (log: {log})")
            return ""
        offline = json.loads(result.read_text())
        return (
            f"vLLM alone, offline (`LLM.generate`, bench/offline.py): {offline['requests']} "
            f"requests of this workload at once, {offline['tokens_per_s']:,.0f} tokens/s\n"
        )

    def _load(self, system: systems.System, target: str, model: Path) -> LoadGroup:
        deployment = self.deployment(model, self.args.ranks)
        return load_group(system, target, model, self.args.load_cores, self.logs, deployment)

    @contextlib.contextmanager
    def started(
        self, labels: Sequence[str], model: Path
    ) -> Iterator[dict[str, tuple[LoadGroup, int | None]]]:
        """These systems' load processes (and servers), ready; the ones that
        cannot run are left out with a note saying why. The servers start
        together: each waits minutes for its engine, mostly alone."""
        wanted = [SYSTEMS[label] for label in labels]
        owners = [system for system in wanted if system.drives is None]
        with contextlib.ExitStack() as stack:
            started = self._start_owners(owners, model, stack)
            loads: dict[str, tuple[LoadGroup, int | None]] = {}
            for system in wanted:
                if isinstance(floor := started.get(system.label), LoadGroup):
                    loads[system.label] = (floor, floor.pid)
                    continue
                server = started.get(system.owner)
                if not isinstance(server, systems.Running):
                    if system.drives is not None:
                        self._note(f"{system.label} could not run here: "
                                   f"{system.drives} is not running")  # fmt: skip
                    continue
                try:
                    load = self._load(system, server.target, model)
                except systems.Unavailable as e:
                    self._note(f"{system.label} could not run here: {e}")
                    continue
                stack.callback(load.close)
                loads[system.label] = (load, server.front_end_pid)
            yield loads

    def _note(self, note: str) -> None:
        self.notes.append(note)
        print(note, flush=True)

    def _start_owners(
        self, owners: Sequence[systems.System], model: Path, stack: contextlib.ExitStack
    ) -> dict[str, systems.Running | LoadGroup]:
        """The servers (the floor: its load process) of these systems, started
        at once; each one's stop is left on `stack`."""
        with ThreadPoolExecutor(max(len(owners), 1)) as pool:
            starts = {system.label: pool.submit(self._start, system, model) for system in owners}
        started: dict[str, systems.Running | LoadGroup] = {}
        failed: BaseException | None = None
        for label, start in starts.items():
            try:
                running, system_stack = start.result()
            except systems.Unavailable as e:
                self._note(f"{label} could not run here: {e}")
                continue
            except BaseException as e:  # the others started: stop them on the way out
                failed = failed or e
                continue
            stack.enter_context(system_stack)
            started[label] = running
        if failed is not None:  # the caller's stack stops those that started
            raise failed
        return started

    def _start(
        self, system: systems.System, model: Path
    ) -> tuple[systems.Running | LoadGroup, contextlib.ExitStack]:
        """Starts the system's server (the floor: its load process, which
        holds the engine), or finds it at the address given."""
        args = self.args
        stack = contextlib.ExitStack()
        print(f"starting {system.label} ({model.name})", flush=True)
        try:
            if system.start is None:  # an owner with no server: it holds the engine
                floor = self._load(system, "-", model)
                stack.callback(floor.close)
                return floor, stack
            if system.address_option and (address := getattr(args, system.address_option)):
                return systems.Running(address, None), stack
            deployment = self.deployment(model, system.ranks or args.ranks)
            return stack.enter_context(system.start(deployment)), stack
        except BaseException:
            stack.close()
            raise

    def groups(self) -> list[list[str]]:
        """The systems that run at once: all of them, or (--apart) each with
        the systems that drive its server."""
        args = self.args
        wanted = [*args.systems, *([SCALED] if args.scaling else [])]
        if not args.apart:
            return [wanted]
        owners = dict.fromkeys(SYSTEMS[label].owner for label in wanted)
        return [[label for label in wanted if SYSTEMS[label].owner == owner] for owner in owners]

    def compare(self, model: Path) -> Results:
        results: Results = {}
        for group in self.groups():
            with self.started(group, model) as loads:
                self._measure(loads, model, results)
        return results

    def _measure(
        self, loads: dict[str, tuple[LoadGroup, int | None]], model: Path, results: Results
    ) -> None:
        """Every round of every concurrency on these systems, in turns."""
        args = self.args
        shape = Shape(tuple(args.prompt_tokens), tuple(args.output_tokens))
        names = list(loads)
        for name, (load, pid) in loads.items():  # warm up every path once
            load.run(requests(-1, 8, vocab_size(model), shape), 4, pid)
            results[name] = {}
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                count = self.requests_per_run(concurrency)
                seed = args.seed * 10_000 + round_ * 1000 + concurrency
                batch = requests(seed, count, vocab_size(model), shape)
                turn = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in turn:
                    load, pid = loads[name]
                    run = load.run(batch, concurrency, pid)
                    results[name].setdefault(concurrency, []).append(run)
                    tokens = sum(t.output_tokens for t in run.timings)
                    first_error = f" ({run.errors[0]})" if run.errors else ""
                    print(f"{model.name} round {round_ + 1} c={concurrency} {name}: "
                          f"{tokens / run.wall_s:,.0f} tok/s, {len(run.errors)} errors"
                          f"{first_error}, load {load_average()}", flush=True)  # fmt: skip

    @contextlib.contextmanager
    def _standin(self, index: int) -> Iterator[systems.Running]:
        """A router process over the engine stand-in (bench/standin.py)."""
        listen = f"127.0.0.1:{free_port()}"
        log = self.logs / f"standin-{index}.log"
        proc = systems.spawn(["-m", "bench.standin", "--listen", listen], {}, log)
        try:
            with grpc.insecure_channel(listen) as channel:
                systems.wait_ready(proc, systems.serving(channel, ""), 120, log)
            yield systems.Running(listen, proc.pid)
        finally:
            stop_group(proc)

    def ceiling(self) -> Results:
        """The streaming ceiling of one router process over the engine
        stand-in; with several load processes also the load generator's own,
        each process against a stand-in of its own, so that no one router
        limits it: what the load can take, whatever it drives."""
        args = self.args
        shape = Shape((16, 16), (args.ceiling_tokens, args.ceiling_tokens))
        top = max(args.concurrency)
        results: Results = {}
        with contextlib.ExitStack() as stack:
            standins = [stack.enter_context(self._standin(i)) for i in range(len(args.load_cores))]
            one = self._load(SYSTEMS["dprouter"], standins[0].target, MODELS["tiny"])
            stack.callback(one.close)
            rows: list[tuple[str, LoadGroup, int | None, tuple[int, ...]]] = [
                (CEILING, one, standins[0].front_end_pid, (1, top))
            ]
            if len(standins) > 1:
                apart = LoadGroup([
                    LoadProcess(PYTHON_LOAD, ["dprouter", standin.target, "--pin", str(core)],
                                self.logs / f"load-generator-{core}.log")
                    for standin, core in zip(standins, args.load_cores, strict=True)
                ])  # fmt: skip
                stack.callback(apart.close)
                rows.append((f"{GENERATOR} ({len(standins)} processes)", apart, None, (top,)))
            for round_ in range(args.rounds):
                for name, load, pid, concurrencies in rows:
                    for concurrency in concurrencies:
                        batch = requests(round_, 2 * concurrency, 1000, shape)
                        run = load.run(batch, concurrency, pid)
                        results.setdefault(name, {}).setdefault(concurrency, []).append(run)
        return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, concurrency 1 and 8, 1 round")  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help=f"{', '.join(MODELS)} or a model's folder"
    )
    every = [label for label in SYSTEMS if label != SCALED]
    parser.add_argument("--systems", nargs="+", default=every, choices=every)
    parser.add_argument("--apart", action="store_true",
                        help="start, measure and stop one system at a time (with those that "
                             "drive its server): each has the machine to itself, a GPU at "
                             "vLLM's default memory share")  # fmt: skip
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests per run: this many per concurrent stream ...")  # fmt: skip
    parser.add_argument("--min-requests", type=int, default=24, help="... and at least this many")
    parser.add_argument(
        "--prompt-tokens", nargs=2, type=int, default=[16, 256], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--output-tokens", nargs=2, type=int, default=[16, 128], metavar=("MIN", "MAX")
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ranks", type=int, default=1, help="ranks of every system")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                        help="also dprouter with 2 ranks (scaling)")  # fmt: skip
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="the streaming ceiling over an engine stand-in")  # fmt: skip
    parser.add_argument(
        "--ceiling-tokens", type=int, default=256, help="tokens per stand-in stream"
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--load-cores", nargs="+", type=int, default=[0],
                        help="a load process per system on each of these cores")  # fmt: skip
    parser.add_argument(
        "--dprouter-address", help="a running router (ranks anywhere) instead of local ranks"
    )
    parser.add_argument(
        "--vllm-grpc-address", help="a running vLLM gRPC server instead of a local one"
    )
    parser.add_argument("--vllm-http-url", help="a running vLLM HTTP server (http://host:port)")
    parser.add_argument("--platform", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the engines' defaults (tools/platforms.py)")  # fmt: skip
    parser.add_argument("--engine-flags", default="",
                        help="vLLM flags for every engine, after the platform's")  # fmt: skip
    parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                        help="also vLLM alone, offline, on the same workload")  # fmt: skip
    parser.add_argument("--tag", default="", help="results in <date>-TAG.md (e.g. the machine)")
    parser.add_argument("--logs", default="/tmp/dprouter-bench")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.concurrency, args.rounds = ["tiny"], [1, 8], 1
        args.min_requests, args.requests_per_stream, args.scaling = 8, 2, False
        args.offline = False
    return args


def model_path(model: str) -> Path:
    """A built-in model's directory, or the directory given."""
    return MODELS.get(model) or Path(model).resolve()


def model_label(model: str) -> str:
    return model if model in MODELS else Path(model).name


def model_sections(
    name: str,
    results: Results,
    args: argparse.Namespace,
    started: datetime.datetime,
    notes: list[str],
) -> list[str]:
    """The model's tables (systems, overhead, scaling) and its plot."""
    compared = {k: v for k, v in results.items() if k != SCALED}
    label = model_label(name)
    sections = [
        f"### {label} ({model_path(name)}), {args.ranks} rank(s)\n\n"
        f"{report.systems_table(compared)}\n",
    ]
    if FLOOR in compared and report.REFERENCE in compared:  # else the table has no rows
        overhead = report.overhead_table(compared, FLOOR, [1, max(args.concurrency)])
        sections.append(f"Router overhead over the in-process floor ({label}):\n\n{overhead}\n")
    if SCALED in results:
        high = [c for c in args.concurrency if c >= 32] or [max(args.concurrency)]
        scaled = {k: {c: results[k][c] for c in high} for k in ("dprouter", SCALED) if k in results}
        sections.append(
            f"Scaling ({label}): dprouter with 1 rank against 2 ranks\n\n"
            f"{report.systems_table(scaled)}\n"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{started:%Y-%m-%d}-{label}.png"
    if report.plot(compared, f"{label}: {args.ranks} rank(s), {started:%Y-%m-%d}", png):
        sections.append(f"![{label}]({png.name})\n")
    else:
        notes.append("matplotlib is not installed: no plot")
    return sections


def header(args: argparse.Namespace, started: datetime.datetime, notes: list[str],
           load_before: str, done: bool) -> str:  # fmt: skip
    lines = [
        f"## Benchmark {started:%Y-%m-%d %H:%M} UTC{'' if done else ' (under way)'}",
        "",
        f"- machine: {machine()}",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_average()}",
        f"- command: `python -m bench.compare {' '.join(sys.argv[1:])}`",
        f"- workload: prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} random token ids, "
        f"{args.output_tokens[0]}-{args.output_tokens[1]} greedy output tokens (EOS ignored), "
        f"seed {args.seed}; per run max({args.min_requests}, {args.requests_per_stream} x "
        f"concurrency) requests in a closed loop; {args.rounds} round(s), "
        f"{'each system alone' if args.apart else 'systems in turns'}",
        "- ratios in brackets: the value over dprouter's at the same concurrency; "
        "front-end CPU: the router process, vLLM's server process, or (inprocess) "
        "the whole load process, engine client and load alike",
        *(f"- note: {note}" for note in notes),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    bench = Bench(args)
    started = datetime.datetime.now(datetime.UTC)
    load_before = load_average()
    tag = "".join(f"-{t}" for t in (args.tag, "quick" if args.quick else "") if t)
    out = Path(args.out) / f"{started:%Y-%m-%d}{tag}.md"
    # The day's earlier runs stay, below this one.
    earlier = out.read_text() if out.exists() else ""
    sections: list[str] = []

    def write(done: bool = False) -> str:
        """The report so far, written after each part: a failure later keeps it."""
        text = header(args, started, bench.notes, load_before, done) + "\n" + "\n".join(sections)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + (f"\n{earlier}" if earlier else ""))
        return text

    for name in args.models:
        results = bench.compare(model_path(name))
        sections.extend(model_sections(name, results, args, started, bench.notes))
        write()
        if args.offline and (line := bench.offline(model_path(name))):
            sections.append(line)
            write()
    if args.ceiling:
        ceiling = report.systems_table(bench.ceiling())
        generator = (
            ", and the load generator's own: its processes, each against a stand-in of its "
            "own, so no system above could outrun this row"
        )
        sections.append(
            "Streaming ceiling of one router process over an engine stand-in "
            f"(bench/standin.py; {args.ceiling_tokens} one-token messages a stream)"
            f"{generator if len(args.load_cores) > 1 else ''}:\n\n{ceiling}\n"
        )
        write()
    sections.append(cost_table() + "\n")
    text = write(done=True)
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()

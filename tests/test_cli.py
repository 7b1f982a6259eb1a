"""The `dprouter` command against the live router, and against no router."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dprouter.cli import parse_args, sampling_params
from tests.conftest import ROOT
from tools.local_cluster import LocalCluster, free_port

# The console script that installing the package (`make setup`) makes.
SCRIPT = Path(sys.executable).parent / "dprouter"


def dprouter(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_console_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing: `pip install -e .` makes it"


def test_sampling_flags_set_only_the_fields_given() -> None:
    args = parse_args([
        "generate", "Hi", "--top-k", "40", "--min-p", "0.05", "--seed", "7", "--stop", ".",
        "--stop", "\n", "--min-tokens", "2", "--temperature", "0", "--top-p", "0.9",
    ])  # fmt: skip
    sampling = sampling_params(args)
    assert (sampling.top_k, sampling.seed, sampling.min_tokens) == (40, 7, 2)
    assert sampling.min_p == pytest.approx(0.05) and sampling.top_p == pytest.approx(0.9)
    assert list(sampling.stop) == [".", "\n"]
    assert sampling.HasField("temperature") and sampling.temperature == 0  # greedy, not unset
    # Flags not given stay unset, for the router to apply vLLM's defaults.
    plain = sampling_params(parse_args(["generate", "Hi"]))
    assert [field.name for field, _ in plain.ListFields()] == ["max_tokens"]
    assert not sampling_params(parse_args(["generate", "Hi", "--token-ids"])).detokenize


def test_system_without_chat_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["generate", "Hi", "--system", "Be brief."])
    assert exited.value.code == 2
    assert "--system goes with --chat" in capsys.readouterr().err


def test_generate_streams_to_stdout_and_says_where_to_stderr(cluster: LocalCluster) -> None:
    address = cluster.spec.listen
    result = dprouter("generate", "Hello", "--max-tokens", "5", "--temperature", "0",
                      "--ignore-eos", "--rank", "1", "--address", address)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert re.fullmatch(
        r"\[rank 1 \(pin: data_parallel_rank\), length, \d+ prompt \+ 5 tokens, request \S+\]\n",
        result.stderr,
    ), result.stderr


def test_generate_token_ids(cluster: LocalCluster) -> None:
    result = dprouter("generate", "Hello", "--max-tokens", "5", "--temperature", "0",
                      "--ignore-eos", "--token-ids", "--address", cluster.spec.listen)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+( \d+){4}\n", result.stdout), result.stdout
    assert "5 tokens" in result.stderr


def test_generate_chat_with_a_session(cluster: LocalCluster) -> None:
    result = dprouter("generate", "Hi", "--chat", "--system", "Be brief.", "--session", "u7",
                      "--max-tokens", "3", "--address", cluster.spec.listen)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(affinity: session_" in result.stderr


def test_health_lists_the_router_and_every_rank(cluster: LocalCluster) -> None:
    result = dprouter("health", "--address", cluster.spec.listen)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows == [
        ["router", "SERVING"],
        ["dprouter.v1.GenerateService", "SERVING"],
        ["rank/0", "SERVING"],
        ["rank/1", "SERVING"],
    ]


def test_ranks_table_drain_resume_and_health_watch(cluster: LocalCluster) -> None:
    address = cluster.spec.listen
    table = dprouter("ranks", "--address", address)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["rank", "state", "in_flight"]
    assert [row.split()[:2] for row in rows] == [["0", "serving"], ["1", "serving"]]

    watch = subprocess.Popen(
        [str(SCRIPT), "health", "--watch", "--address", address],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    stdout = watch.stdout
    assert stdout is not None

    def read_lines() -> None:
        for line in stdout:
            lines.put(line)

    # A thread, so that waiting for a line can time out.
    threading.Thread(target=read_lines, daemon=True).start()

    def next_line_for(name: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line.split()[1] == name:
                return line.split()[2]

    try:
        assert next_line_for("rank/1") == "SERVING"
        drained = dprouter("ranks", "drain", "1", "--address", address)
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.splitlines()[1].split()[:2] == ["1", "draining"]
        assert next_line_for("rank/1") == "NOT_SERVING"
    finally:
        resumed = dprouter("ranks", "resume", "1", "--address", address)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[1].split()[:2] == ["1", "serving"]
    try:
        assert next_line_for("rank/1") == "SERVING"
    finally:
        watch.terminate()
        watch.wait(timeout=10)


def test_bad_input_is_one_line(cluster: LocalCluster) -> None:
    result = dprouter("generate", "Hi", "--top-p", "1.5", "--address", cluster.spec.listen)
    assert result.returncode == 1
    assert result.stderr.startswith("dprouter: INVALID_ARGUMENT: sampling.top_p: ")
    assert result.stderr.count("\n") == 1


def test_no_router_is_one_helpful_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    for command in (["health"], ["ranks"], ["generate", "Hi"]):
        result = dprouter(*command, "--address", address)
        assert result.returncode == 1, command
        assert result.stderr == (
            f"dprouter: cannot reach the router at {address}: is it running? (make run)\n"
        )
        assert result.stdout == ""

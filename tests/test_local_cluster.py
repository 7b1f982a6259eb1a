"""Ctrl-C or SIGTERM on `python -m tools.local_cluster` (what `make run`
starts) stops every process it started, the engine processes included (none
is orphaned), and it exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, tiny_spec
from tools.local_cluster import LocalCluster

SERVING_TIMEOUT_S = 180
EXIT_TIMEOUT_S = 60


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; `is_running` also checks the start time, so a
    reused pid does not count."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_leaves_no_engine_process_behind(
    stop: signal.Signals, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec = tiny_spec(f"stop-{stop.name}", tmp_path_factory, ranks=1)
    assert spec.log_dir is not None
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    with open(spec.log_dir / "local_cluster.log", "wb") as out:
        # Its own process group, as a terminal's foreground job is: Ctrl-C
        # signals the group.
        cluster = subprocess.Popen(
            [sys.executable, "-m", "tools.local_cluster", "--model", spec.model,
             "--ranks", "1", "--listen", spec.listen, "--rpc-port", str(spec.rpc_port),
             "--max-model-len", str(spec.max_model_len), "--timeout", str(SERVING_TIMEOUT_S)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    descendants: list[psutil.Process] = []
    try:
        # A watcher over the same spec; the command stands in as its process,
        # so that waiting stops if the command dies.
        watcher = LocalCluster(spec)
        watcher.router = cluster
        watcher.wait_serving(SERVING_TIMEOUT_S)
        descendants = psutil.Process(cluster.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in descendants]
        # The router, the rank server and the rank's engine, at least.
        assert any("-m router" in c for c in commands), commands
        assert any("-m server " in c for c in commands), commands
        assert any("EngineCore" in p.name() or "EngineCore" in c
                   for p, c in zip(descendants, commands, strict=True)), commands  # fmt: skip

        os.killpg(cluster.pid, stop)
        assert cluster.wait(EXIT_TIMEOUT_S) == 0
        # The command waited for its processes; a SIGKILL to a group lands
        # an instant later.
        deadline = time.monotonic() + 5
        while running(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(descendants), [(p.pid, p.name()) for p in running(descendants)]
    finally:
        if cluster.poll() is None:  # failed before Ctrl-C: stop it as Ctrl-C would
            descendants = descendants or psutil.Process(cluster.pid).children(recursive=True)
            os.killpg(cluster.pid, signal.SIGINT)
            try:
                cluster.wait(EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(cluster.pid, signal.SIGKILL)
                cluster.wait()
        for process in running(descendants):  # left behind by a failure
            process.kill()

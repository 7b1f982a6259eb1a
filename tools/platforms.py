"""What a local engine is given on this host: the flags, environment and
priority of a CPU engine or a CUDA one, and the GPUs of each rank.

`detect()` finds CUDA where `nvidia-smi` lists GPUs (or CUDA_VISIBLE_DEVICES
names them), else the CPU. Ranks get a GPU (or a tensor-parallel group) of
their own while there are enough, else share them round robin, each with an
equal share of the memory. Flags given after the platform's override them
(vLLM takes the last of a repeated flag).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

# A small CPU machine: float32 (vLLM's CPU kernels), no graph compilation.
CPU_ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager"]
# CPU engines take every core they are given; below the router's priority
# they leave it the moments it needs to answer health checks, refusals and
# streams (which otherwise wait behind an engine's time slice).
CPU_ENGINE_NICENESS = 10
# vLLM's own default share of a GPU's memory for one engine.
GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class Platform:
    name: str  # "cpu" or "cuda"
    gpus: tuple[str, ...] = ()  # CUDA device ids, as CUDA_VISIBLE_DEVICES names them

    @property
    def niceness(self) -> int:
        """The rank servers' `nice` increment (their engines inherit it)."""
        return CPU_ENGINE_NICENESS if self.name == "cpu" else 0

    def flags(self, ranks: int, extra: Sequence[str] = ()) -> list[str]:
        """Every rank's engine flags: the platform's, then `extra`."""
        if self.name == "cpu":
            return [*CPU_ENGINE_FLAGS, *extra]
        sharing = ranks_per_gpu(len(self.gpus), ranks, gpus_per_rank(extra))
        if sharing == 1:
            return list(extra)
        share = math.floor(GPU_MEMORY_UTILIZATION / sharing * 100) / 100
        return ["--gpu-memory-utilization", str(share), *extra]

    def env(self, ranks: int, rank: int, extra: Sequence[str] = ()) -> dict[str, str]:
        """Rank `rank`'s environment; the caller's own overrides it."""
        if self.name == "cpu":
            # 1 GiB of KV cache each, and the cores split among the ranks
            # (an engine would otherwise start a thread per core).
            threads = max(1, (os.cpu_count() or 1) // ranks)
            return {
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
            }
        devices = rank_gpus(self.gpus, rank, gpus_per_rank(extra))
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices)}

    def start_waves(self, ranks: int, extra: Sequence[str] = ()) -> list[list[int]]:
        """The ranks in the order they may start: all at once, but those that
        share a GPU one after another, each once the one before has taken its
        memory. vLLM sizes its KV cache from what it sees used while it
        profiles: beside an engine that allocates, it is left next to none."""
        if self.name == "cpu":
            return [list(range(ranks))]
        at_once = max(len(self.gpus) // gpus_per_rank(extra), 1)
        firsts = range(0, ranks, at_once)
        return [list(range(first, min(first + at_once, ranks))) for first in firsts]


def gpus_per_rank(flags: Sequence[str]) -> int:
    """The tensor-parallel size the flags ask for (the last one given), else 1."""
    size = 1
    for i, flag in enumerate(flags):
        name, _, value = flag.partition("=")
        if name in ("-tp", "--tensor-parallel-size"):
            size = int(value or flags[i + 1])
    return size


def ranks_per_gpu(gpus: int, ranks: int, per_rank: int) -> int:
    """How many ranks each GPU holds when `ranks` ranks of `per_rank` GPUs
    share `gpus` GPUs as evenly as they can."""
    groups = max(gpus // per_rank, 1)
    return math.ceil(ranks / groups)


def rank_gpus(gpus: Sequence[str], rank: int, per_rank: int) -> list[str]:
    """Rank `rank`'s GPUs: `per_rank` of its own while there are enough, else
    the group of them it shares, round robin."""
    group = rank % max(len(gpus) // per_rank, 1)
    return list(gpus[group * per_rank : (group + 1) * per_rank])


def visible_gpus() -> tuple[str, ...]:
    """The CUDA devices this process may use: CUDA_VISIBLE_DEVICES when set,
    else the ones `nvidia-smi` lists; none without a driver."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return tuple(d.strip() for d in named.split(",") if d.strip())
    if shutil.which("nvidia-smi") is None:
        return ()
    listed = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return tuple(line.strip() for line in listed.stdout.splitlines() if line.strip())


def detect(name: str = "auto") -> Platform:
    """The named platform ("cpu", "cuda") or, for "auto", this host's."""
    if name == "cpu":
        return Platform("cpu")
    gpus = visible_gpus()
    if name == "cuda" and not gpus:
        raise RuntimeError("no CUDA device: none listed by nvidia-smi or CUDA_VISIBLE_DEVICES")
    return Platform("cuda", gpus) if gpus else Platform("cpu")

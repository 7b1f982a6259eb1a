"""Engine flags, environment and GPUs per rank on each platform: plain data."""

from __future__ import annotations

import pytest

from tools.platforms import (
    CPU_ENGINE_FLAGS,
    Platform,
    gpus_per_rank,
    rank_gpus,
    ranks_per_gpu,
)


def test_cpu_ranks_get_the_cpu_flags_then_the_callers() -> None:
    cpu = Platform("cpu")
    assert cpu.flags(2, ["--max-num-seqs", "8"]) == [*CPU_ENGINE_FLAGS, "--max-num-seqs", "8"]
    assert cpu.niceness > 0
    assert set(cpu.env(2, 0)) == {"VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS"}


@pytest.mark.parametrize(
    ("gpus", "ranks", "expected"),
    [
        (("0",), 1, [["0"]]),
        (("0",), 2, [["0"], ["0"]]),  # one GPU, shared
        (("0", "1", "2", "3"), 2, [["0"], ["1"]]),  # a GPU each, two left idle
        (("0", "1"), 4, [["0"], ["1"], ["0"], ["1"]]),  # round robin
        (("4", "5"), 2, [["4"], ["5"]]),  # the ids CUDA_VISIBLE_DEVICES named
    ],
)
def test_each_rank_gets_its_own_gpu_while_there_are_enough(
    gpus: tuple[str, ...], ranks: int, expected: list[list[str]]
) -> None:
    cuda = Platform("cuda", gpus)
    visible = [cuda.env(ranks, rank)["CUDA_VISIBLE_DEVICES"].split(",") for rank in range(ranks)]
    assert visible == expected
    assert cuda.niceness == 0


def test_tensor_parallel_ranks_get_a_group_of_gpus_each() -> None:
    assert gpus_per_rank(["--max-num-seqs", "8", "-tp", "2"]) == 2
    assert gpus_per_rank(["--tensor-parallel-size=4"]) == 4
    assert gpus_per_rank([]) == 1
    gpus = tuple(str(i) for i in range(8))
    assert [rank_gpus(gpus, rank, 2) for rank in range(4)] == [
        ["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"],
    ]  # fmt: skip
    env = Platform("cuda", gpus).env(4, 3, ["-tp", "2"])
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_ranks_that_share_a_gpu_share_its_memory() -> None:
    assert ranks_per_gpu(1, 2, 1) == 2
    assert ranks_per_gpu(8, 8, 1) == 1
    assert ranks_per_gpu(2, 3, 1) == 2
    one = Platform("cuda", ("0",))
    assert one.flags(1) == []  # vLLM's default share
    assert one.flags(2, ["--max-num-seqs", "64"]) == [
        "--gpu-memory-utilization", "0.45", "--max-num-seqs", "64",
    ]  # fmt: skip
    assert one.flags(3)[:2] == ["--gpu-memory-utilization", "0.3"]
    # A share given by the caller comes last, so vLLM takes it.
    assert one.flags(2, ["--gpu-memory-utilization", "0.2"])[-1] == "0.2"


def test_ranks_that_share_a_gpu_start_one_after_another() -> None:
    assert Platform("cpu").start_waves(4) == [[0, 1, 2, 3]]
    assert Platform("cuda", ("0",)).start_waves(2) == [[0], [1]]
    assert Platform("cuda", ("0", "1")).start_waves(4) == [[0, 1], [2, 3]]
    assert Platform("cuda", ("0", "1", "2", "3")).start_waves(2) == [[0, 1]]
    assert Platform("cuda", ("0", "1", "2", "3")).start_waves(4, ["-tp", "2"]) == [[0, 1], [2, 3]]

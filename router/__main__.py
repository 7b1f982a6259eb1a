"""`python -m router --model DIR -dp N [flags]`: see router/config.py and docs/configuration.md."""

import asyncio
import contextlib
import ctypes
import sys

from router import logs
from router.app import serve
from router.config import parse_args

# glibc's mallopt parameter, and the size it otherwise starts at.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_big_blocks_to_the_system() -> None:
    """glibc raises its mmap threshold each time it frees a mapped block, so
    that later blocks of that size stay in its heap when freed: after a few
    requests of 4 MB the router kept ~180 MB it no longer used. A fixed
    threshold maps every large block and unmaps it when freed."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def main() -> int:
    return_big_blocks_to_the_system()
    config = parse_args()
    logs.setup(config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

"""`python -m router --model DIR -dp N [flags]`: see router/config.py and README.md."""

import asyncio
import sys

from router import logs
from router.app import serve
from router.config import parse_args


def main() -> int:
    config = parse_args()
    logs.setup(config.log_level)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())

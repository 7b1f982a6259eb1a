"""vLLM alone, offline: `LLM.generate` on the benchmark's workload, all its
requests at once. No front end, no network: the engine's own rate, the line
that the served systems' tokens/s are read against.

    python -m bench.offline --count 256 --vocab-size 1000 --out R.json -- --model DIR ...

Writes requests, output tokens, seconds and tokens per second to --out as JSON
(vLLM logs to stdout).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.workload import Shape, requests
from router.vllm_compat.offline import OfflineEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, required=True, help="requests")
    parser.add_argument("--out", type=Path, required=True, help="the JSON result")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--prompt-tokens", nargs=2, type=int, default=[16, 256])
    parser.add_argument("--output-tokens", nargs=2, type=int, default=[16, 128])
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's flags")
    args = parser.parse_args()
    shape = Shape(tuple(args.prompt_tokens), tuple(args.output_tokens))
    engine = OfflineEngine(args.engine_args)
    warm_up = requests(-1, 8, args.vocab_size, shape)
    engine.generate([r.prompt for r in warm_up], [r.max_tokens for r in warm_up])
    batch = requests(args.seed, args.count, args.vocab_size, shape)
    start = time.perf_counter()
    tokens = engine.generate([r.prompt for r in batch], [r.max_tokens for r in batch])
    wall = time.perf_counter() - start
    result = {"requests": len(batch), "output_tokens": tokens, "wall_s": wall}
    args.out.write_text(json.dumps({**result, "tokens_per_s": tokens / wall}))


if __name__ == "__main__":
    main()

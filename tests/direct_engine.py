"""Greedy token ids from the engine called in-process, with no router: the
reference the router's output must equal.

    python -m tests.direct_engine --out OUT.json --model DIR [engine flags] < prompts.json
writes a JSON list of token-id lists, one per prompt (the prompts run one at a time).
(vLLM logs to stdout, hence the file.)
"""

from __future__ import annotations

import asyncio
import json
import sys

from router.engine_types import EngineRequest, Sampling
from router.vllm_compat import (
    EngineClient,
    add_engine_args,
    engine_sampling_params,
    new_flexible_parser,
)


async def run(client: EngineClient, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outputs = []
    for i, prompt in enumerate(prompts):
        ids: list[int] = []
        params = engine_sampling_params(Sampling.greedy(max_tokens))
        request = EngineRequest(f"direct-{i}", client.encode(prompt), params)
        async for delta in client.generate(request, 0):
            ids.extend(delta.token_ids)
        outputs.append(ids)
    return outputs


def main() -> None:
    parser = new_flexible_parser("greedy reference outputs")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", required=True)
    add_engine_args(parser)
    args = parser.parse_args()
    prompts = json.load(sys.stdin)
    client = EngineClient.start(args, in_process=True)
    try:
        outputs = asyncio.run(run(client, prompts, args.max_tokens))
        with open(args.out, "w") as f:
            json.dump(outputs, f)
    finally:
        client.shutdown()


if __name__ == "__main__":
    main()

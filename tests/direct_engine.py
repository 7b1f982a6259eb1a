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

from router.engine_types import Sampling
from router.vllm_compat import (
    EngineClient,
    add_engine_args,
    engine_sampling_params,
    new_flexible_parser,
)


def greedy(max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens, min_tokens=0, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
        seed=None, stop=[], stop_token_ids=[], presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, n=1, logprobs=None, ignore_eos=True, skip_special_tokens=True,
    )  # fmt: skip


async def run(client: EngineClient, prompts: list[str], max_tokens: int) -> list[list[int]]:
    outputs = []
    for i, prompt in enumerate(prompts):
        ids: list[int] = []
        async for delta in client.generate(
            f"direct-{i}",
            client.encode(prompt),
            engine_sampling_params(greedy(max_tokens)),
            0,
            0,
            None,
        ):
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

"""The front door of admission: a GenerateRequest and its metadata in, an
`Admitted` request in plain types out (checked, tokenized, its engine
parameters accepted), or a precise gRPC status. Nothing past this module
sees the request's proto message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from dprouter.v1 import generate_pb2
from router import admission, validation
from router.engine_types import Sampling
from router.errors import invalid_argument
from router.fleet import Fleet
from router.policies import RouteInput
from router.sampling import engine_sampling
from router.vllm_compat import EngineClientError, engine_sampling_params

# Prompts longer than this are tokenized off the event loop (in the order
# they come), which meanwhile serves everyone else.
INLINE_TOKENIZE_CHARS = 4096
_tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check, tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    params: object  # the engine's sampling parameters (`EngineRequest.params`), opaque
    session_key: str
    pin: validation.Pin | None
    priority: int
    chat: bool  # the prompt was chat messages

    @property
    def route(self) -> RouteInput:
        return RouteInput(self.prompt_token_ids, self.session_key)

    @property
    def ask(self) -> admission.Ask:
        return admission.Ask(len(self.prompt_token_ids), self.sampling.max_tokens * self.sampling.n)


def _prompt_chars(prompt: validation.Prompt) -> int:
    if prompt.text is not None:
        return len(prompt.text)
    return sum(len(m["content"]) for m in prompt.messages or ())


async def admit(
    request: generate_pb2.GenerateRequest,
    metadata: Sequence[tuple[str, str | bytes]],
    fleet: Fleet,
) -> Admitted:
    """The request checked against the model's and the router's limits and
    tokenized; refused at once when nothing has room, before the tokenizer's
    work."""
    limits = fleet.limits
    checked = validation.check_request(request, metadata, limits, fleet.allowed)
    fleet.check_room(checked.rank_pin)
    ids = await _tokenize(checked.prompt, fleet)
    if not ids:
        raise invalid_argument(checked.prompt.field, "tokenizes to no tokens")
    sampling = engine_sampling(
        checked.sampling, checked.prompt.field, len(ids), limits, fleet.allowed
    )
    try:
        params = engine_sampling_params(sampling)
    except EngineClientError as e:  # a rule of vLLM's that ours do not repeat
        parameter = getattr(e, "parameter", None)
        raise invalid_argument(
            f"sampling.{parameter}" if parameter else "sampling", str(e)
        ) from None
    return Admitted(
        request_id=checked.request_id,
        prompt_token_ids=ids,
        sampling=sampling,
        params=params,
        session_key=checked.session_key,
        pin=checked.rank_pin,
        priority=checked.priority,
        chat=checked.prompt.messages is not None,
    )


def tokenize(
    prompt: validation.Prompt,
    encode: Callable[[str], list[int]],
    render_chat: Callable[[list[dict[str, str]]], list[int]],
) -> list[int]:
    """The prompt as token ids; a chat template that rejects the messages is the
    client's error."""
    if prompt.token_ids is not None:
        return prompt.token_ids
    if prompt.text is not None:
        return encode(prompt.text)
    assert prompt.messages is not None
    try:
        return render_chat(prompt.messages)
    except Exception as e:  # jinja2 raises its own types from templates
        raise invalid_argument("messages", f"the chat template rejected them: {e}") from None


async def _tokenize(prompt: validation.Prompt, fleet: Fleet) -> list[int]:
    pool = fleet.pool
    if prompt.token_ids is not None or _prompt_chars(prompt) <= INLINE_TOKENIZE_CHARS:
        return tokenize(prompt, pool.encode, pool.render_chat)
    return await asyncio.get_running_loop().run_in_executor(
        _tokenizer_thread, tokenize, prompt, pool.encode, pool.render_chat
    )

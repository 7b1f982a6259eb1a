"""Reads requests off the wire: names the field protobuf refused to parse,
and leaves an oversized prompt unparsed.

proto3 `string` fields must hold valid UTF-8; protobuf rejects the whole
message otherwise and gRPC would answer INTERNAL with no hint. The interceptor
here catches the parse failure and answers INVALID_ARGUMENT naming the field,
found by walking the wire format against the request's descriptor.

A prompt longer than any the model's context could hold (`validation.
max_prompt_bytes`) is cut out of the wire bytes before the rest is parsed,
and its size noted (`oversized_prompt`) for validation to refuse: parsing
and checking 4 MB of text took ~10 ms of the event loop and left its
buffers in the router's memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise _Truncated
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _length_delimited(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """The length-delimited fields of one message's wire bytes, in order:
    (field number, where its entry starts, where its key ends, where its
    value starts, where it ends). Other fields are skipped; a broken wire
    format raises _Truncated."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            key_end = pos
            length, value = _varint(data, pos)
            pos = value + length
            if pos > len(data):
                raise _Truncated
            yield number, start, key_end, value, pos
        else:
            raise _Truncated


def bad_field(data: bytes, message: Descriptor, prefix: str = "") -> str | None:
    """The path of the first string field that is not UTF-8, or of the message
    itself if its wire format is broken; None if neither."""
    seen: Counter[int] = Counter()
    try:
        for number, _, _, value, end in _length_delimited(data):
            field = message.fields_by_number.get(number)
            if field is None:
                continue
            path = prefix + field.name
            if field.is_repeated:
                path += f"[{seen[number]}]"
                seen[number] += 1
            chunk = data[value:end]
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                inner = bad_field(chunk, field.message_type, path + ".")  # type: ignore[arg-type]
                if inner is not None:
                    return inner
    except _Truncated:
        return prefix.rstrip(".") or "request"
    return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def cut_field(data: bytes, path: Sequence[int], longer_than: int) -> tuple[bytes, int] | None:
    """`data` without the length-delimited field at `path` (field numbers,
    outermost first), and that field's length, when it is longer than
    `longer_than` bytes; None when it is not there or not that long, or when
    the wire format is broken (the parser then names the problem)."""
    cut, size = [], 0
    try:
        for number, start, key_end, value, end in _length_delimited(data):
            if number != path[0]:
                continue
            if len(path) == 1:
                if end - value > longer_than:
                    cut.append((start, end, b""))
                    size = max(size, end - value)
            elif (inner := cut_field(data[value:end], path[1:], longer_than)) is not None:
                field, found = inner
                cut.append((start, end, data[start:key_end] + _encode_varint(len(field)) + field))
                size = max(size, found)
    except _Truncated:
        return None
    if not cut:
        return None
    pieces, last = [], 0
    for start, end, replacement in cut:
        pieces += [data[last:start], replacement]
        last = end
    pieces.append(data[last:])
    return b"".join(pieces), size


# The size of the request's prompt when the interceptor cut it out (None: not cut).
_OVERSIZED_PROMPT: ContextVar[int | None] = ContextVar("oversized_prompt", default=None)


def oversized_prompt() -> int | None:
    """The size in bytes of this request's prompt if it was cut out unparsed."""
    return _OVERSIZED_PROMPT.get()


def _prompt_path(message: Descriptor) -> list[int] | None:
    """Field numbers down to the request's `prompt`: in it, or in its `request`."""
    if "prompt" in message.fields_by_name:
        return [message.fields_by_name["prompt"].number]
    inner = message.fields_by_name.get("request")
    if inner is not None and inner.message_type is not None:
        rest = _prompt_path(inner.message_type)
        return None if rest is None else [inner.number, *rest]
    return None


class _Malformed:
    def __init__(self, problem: str) -> None:
        self.problem = problem


def _input_type(method: str) -> Descriptor | None:
    if not method.startswith("/dprouter."):
        return None  # only our own services (Health.Watch is not a generator)
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return None
    return found.input_type if found is not None else None


if TYPE_CHECKING:
    from router.rpc import Context, Continuation, Handler


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns unparsable requests into INVALID_ARGUMENT naming the bad field,
    and cuts out prompts over `prompt_bound()` bytes (None: no bound yet)."""

    def __init__(self, prompt_bound: Callable[[], int | None]) -> None:
        self._prompt_bound = prompt_bound
        # Per method, its handler with our parsing: built at the method's
        # first call, not at every call. Last in the chain, this interceptor
        # always receives the registered handler, so one per method.
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if (checked := self._handlers.get(method)) is not None:
            return checked
        input_type = _input_type(method)
        if handler is None or input_type is None or handler.request_deserializer is None:
            return handler
        checked = self._handlers[method] = _checking(handler, input_type, self._prompt_bound)
        return checked


def _checking(
    handler: Handler, message: Descriptor, prompt_bound: Callable[[], int | None]
) -> Handler:
    """`handler`, answering INVALID_ARGUMENT to a request that does not parse,
    and parsing a request whose prompt is over the bound without it."""
    parse = handler.request_deserializer
    assert parse is not None
    prompt_path = _prompt_path(message)

    def deserialize(data: bytes) -> Any:
        bound = prompt_bound()
        if (
            prompt_path is not None
            and bound is not None
            and len(data) > bound
            and (cut := cut_field(data, prompt_path, bound)) is not None
        ):
            data, size = cut
            # The handler runs in this task, and validation reads it there.
            _OVERSIZED_PROMPT.set(size)
        try:
            return parse(data)
        except DecodeError:
            field = bad_field(data, message)
            if field is None or field == "request":
                return _Malformed("request: not a valid protobuf message")
            return _Malformed(f"{field}: not valid UTF-8")

    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary  # an async servicer method here

        async def unary_behavior(request: Any, context: Context) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_behavior, deserialize, handler.response_serializer
        )
    if handler.unary_stream is not None:
        stream: Any = handler.unary_stream  # an async generator here

        async def stream_behavior(request: Any, context: Context) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            async for response in stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior, deserialize, handler.response_serializer
        )
    return handler

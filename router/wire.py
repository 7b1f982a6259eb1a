"""Names the field of a request that protobuf refused to parse.

proto3 `string` fields must hold valid UTF-8; protobuf rejects the whole
message otherwise and gRPC would answer INTERNAL with no hint. The interceptor
here catches the parse failure and answers INVALID_ARGUMENT naming the field,
found by walking the wire format against the request's descriptor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
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


def bad_field(data: bytes, message: Descriptor, prefix: str = "") -> str | None:
    """The path of the first string field that is not UTF-8, or of the message
    itself if its wire format is broken; None if neither."""
    seen: Counter[int] = Counter()
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                if pos > len(data):
                    raise _Truncated
                field = message.fields_by_number.get(number)
                if field is None:
                    continue
                path = prefix + field.name
                if field.is_repeated:
                    path += f"[{seen[number]}]"
                    seen[number] += 1
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = bad_field(chunk, field.message_type, path + ".")  # type: ignore[arg-type]
                    if inner is not None:
                        return inner
            else:
                raise _Truncated
    except _Truncated:
        return prefix.rstrip(".") or "request"
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


if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns unparsable requests into INVALID_ARGUMENT naming the bad field."""

    def __init__(self) -> None:
        # Per method, its handler with our parsing: built at the method's
        # first call, not at every call. Last in the chain, this interceptor
        # always receives the registered handler, so one per method.
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if (checked := self._handlers.get(method)) is not None:
            return checked
        input_type = _input_type(method)
        if handler is None or input_type is None or handler.request_deserializer is None:
            return handler
        checked = self._handlers[method] = _checking(handler, input_type)
        return checked


def _checking(handler: Handler, message: Descriptor) -> Handler:
    """`handler`, answering INVALID_ARGUMENT to a request that does not parse."""
    parse = handler.request_deserializer
    assert parse is not None

    def deserialize(data: bytes) -> Any:
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

"""One trace per request reaches a real OTLP receiver: the router's SERVER
span continuing the client's W3C traceparent, its `validate`, `route` and
per-attempt children, and vLLM's own `llm_request` span under the attempt."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from dprouter.v1 import generate_pb2, generate_pb2_grpc, ranks_pb2, ranks_pb2_grpc
from tests.conftest import LONG_TOKENS, ROOT, OtlpReceiver

GENERATE = "dprouter.v1.GenerateService/Generate"
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    values: dict[str, object] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        value = getattr(kv.value, kind) if kind else None
        if kind == "array_value":
            value = [
                getattr(item, item.WhichOneof("value") or "")
                for item in kv.value.array_value.values
            ]
        values[kv.key] = value
    return values


async def wait_for_span(
    receiver: OtlpReceiver, match: Callable[[trace_pb2.Span], bool], timeout: float = 10
) -> trace_pb2.Span:
    for _ in range(int(timeout / 0.1)):
        found = [s for s in receiver.spans() if match(s)]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no such span arrived")


def in_trace(receiver: OtlpReceiver, trace_id: bytes) -> dict[str, trace_pb2.Span]:
    """The trace's spans by name (each name once)."""
    spans = [s for s in receiver.spans() if s.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans), [s.name for s in spans]
    return by_name


async def wait_for_trace(
    receiver: OtlpReceiver, trace_id: bytes, names: set[str], timeout: float = 10
) -> dict[str, trace_pb2.Span]:
    """The trace's spans once all of `names` have arrived."""
    for _ in range(int(timeout / 0.1)):
        spans = in_trace(receiver, trace_id)
        if names <= spans.keys():
            return spans
        await asyncio.sleep(0.1)
    raise AssertionError(f"missing spans {names - spans.keys()}; got {sorted(spans)}")


async def trace_id_of(call: Any, where: str = "initial_metadata") -> bytes:
    """The x-trace-id the router answered with, from the headers or trailers."""
    value = dict(await getattr(call, where)())["x-trace-id"]
    assert isinstance(value, str)
    return bytes.fromhex(value)


async def wait_for_attempts(
    receiver: OtlpReceiver, trace_id: bytes, count: int, timeout: float = 10
) -> list[trace_pb2.Span]:
    """The trace's per-rank attempt spans, first first, once `count` arrived."""
    for _ in range(int(timeout / 0.1)):
        spans = [
            s
            for s in receiver.spans()
            if s.trace_id == trace_id and s.name.startswith("text_completion ")
        ]
        if len(spans) >= count:
            return sorted(spans, key=lambda s: s.start_time_unix_nano)
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(spans)} attempt spans, not {count}")


def engine_span_name(spans: dict[str, trace_pb2.Span]) -> str:
    (name,) = [n for n in spans if n.startswith("text_completion ")]
    return name


def request(prompt: str, max_tokens: int, **fields: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        **fields,  # type: ignore[arg-type]
    )


async def test_trace_continues_the_client_traceparent_down_to_the_engine_span(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    call = generate.Generate(
        request("Hello", 7, request_id="traced-1", data_parallel_rank=1),
        metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
    )
    responses = [r async for r in call]
    assert dict(await call.initial_metadata())["x-trace-id"] == trace_id

    spans = await wait_for_trace(
        receiver, bytes.fromhex(trace_id), {GENERATE, "validate", "route", "llm_request"}
    )
    server = spans[GENERATE]
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == parent_id
    attrs = attributes(server)
    assert attrs["gen_ai.request.id"] == "traced-1"
    assert attrs["vllm.data_parallel_rank"] == 1
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.usage.input_tokens"] == responses[-1].usage.prompt_tokens
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == responses[-1].usage.cached_tokens
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.max_tokens"] == 7
    assert attrs["rpc.grpc.status_code"] == 0
    assert server.status.code != ERROR

    engine_name = engine_span_name(spans)
    for child in ("validate", "route", engine_name):
        assert spans[child].parent_span_id == server.span_id, child
    route = attributes(spans["route"])
    assert (route["dprouter.route.policy"], route["dprouter.route.reason"]) == (
        "pin",
        "data_parallel_rank",
    )
    assert route["dprouter.route.rank"] == 1
    assert route["dprouter.route.candidate_ranks"] == [0, 1]
    assert len(route["dprouter.route.candidate_scores"]) == 2  # type: ignore[arg-type]
    assert route["dprouter.rank.in_flight"] >= 1  # type: ignore[operator]

    attempt = spans[engine_name]
    assert attempt.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert attributes(attempt)["vllm.data_parallel_rank"] == 1
    assert attributes(attempt)["gen_ai.response.finish_reasons"] == ["length"]
    assert [e.name for e in attempt.events] == ["first_token"]
    assert spans["validate"].end_time_unix_nano <= spans["route"].start_time_unix_nano
    assert spans["route"].end_time_unix_nano <= attempt.start_time_unix_nano

    engine = spans["llm_request"]  # vLLM's own span, a child of the attempt
    assert engine.parent_span_id == attempt.span_id
    assert attributes(engine)["gen_ai.usage.completion_tokens"] == 7


async def test_routing_decision_of_the_policy_is_on_the_route_span(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    call = generate.Generate(request("Where to?", 3, session_key="traced-session"))
    _ = [r async for r in call]
    headers = dict(await call.initial_metadata())
    spans = await wait_for_trace(receiver, await trace_id_of(call), {GENERATE, "route"})
    assert spans[GENERATE].parent_span_id == b""  # no traceparent: a new root
    assert attributes(spans[GENERATE])["gen_ai.conversation.id"] == "traced-session"
    route = attributes(spans["route"])
    assert route["dprouter.route.policy"] == headers["x-route-policy"] == "affinity"
    assert route["dprouter.route.reason"] == headers["x-route-reason"]
    assert route["dprouter.route.rank"] == int(headers["x-data-parallel-rank"])
    assert sorted(route["dprouter.route.candidate_ranks"]) == [0, 1]  # type: ignore[call-overload]


async def test_rejected_request_gets_an_error_span_and_a_failed_validate_span(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    bad = generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(top_p=3.0))
    call = generate.Generate(bad)
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    # No header was sent: the trace id comes in the trailers.
    trace_id = await trace_id_of(call, "trailing_metadata")
    spans = await wait_for_trace(receiver, trace_id, {GENERATE, "validate"})
    server = spans[GENERATE]
    assert server.status.code == ERROR
    assert "sampling.top_p" in server.status.message
    assert attributes(server)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert attributes(server)["error.type"] == "INVALID_ARGUMENT"
    assert spans["validate"].status.code == ERROR
    assert "sampling.top_p" in spans["validate"].status.message
    await asyncio.sleep(0.5)  # anything else of this trace would have arrived
    assert set(in_trace(receiver, trace_id)) == {GENERATE, "validate"}  # never routed


async def test_request_to_a_drained_rank_gets_a_failed_route_span(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
    ranks: ranks_pb2_grpc.RanksServiceAsyncStub,
    otlp_receiver: tuple[OtlpReceiver, int],
) -> None:
    receiver, _ = otlp_receiver
    await ranks.DrainRank(ranks_pb2.DrainRankRequest(rank=0))
    try:
        call = generate.Generate(request("pinned", 2, data_parallel_rank=0))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
    finally:
        await ranks.ResumeRank(ranks_pb2.ResumeRankRequest(rank=0))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trace_id = await trace_id_of(call, "trailing_metadata")
    spans = await wait_for_trace(receiver, trace_id, {GENERATE, "validate", "route"})
    assert spans["validate"].status.code != ERROR
    assert spans["route"].status.code == ERROR
    assert "draining" in spans["route"].status.message
    assert attributes(spans[GENERATE])["error.type"] == "FAILED_PRECONDITION"


async def test_deadline_exceeded_request_gets_spans_with_that_status(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    call = generate.Generate(request("a long one", LONG_TOKENS, request_id="too-slow"), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server = await wait_for_span(
        receiver, lambda s: attributes(s).get("gen_ai.request.id") == "too-slow"
    )
    assert attributes(server)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert server.status.code == ERROR
    spans = await wait_for_trace(receiver, server.trace_id, {GENERATE, "route"})
    # Ended on its rank, or refused at admission when the rank's pace said
    # its first token could not come before the deadline (see admission.py).
    attempts = [name for name in spans if name.startswith("text_completion ")]
    ended_in = spans[attempts[0] if attempts else "route"]
    assert ended_in.status.code == ERROR
    if not attempts:
        assert attributes(ended_in)["error.type"] == "DEADLINE_EXCEEDED"


async def test_cancelled_request_gets_spans_with_that_status(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    receiver, _ = otlp_receiver
    call = generate.Generate(request("cancel me", LONG_TOKENS, request_id="traced-cancel"))
    async for _ in call:
        break  # the first token came: the request is running in the engine
    trace_id = await trace_id_of(call)
    call.cancel()
    server = await wait_for_span(
        receiver, lambda s: attributes(s).get("gen_ai.request.id") == "traced-cancel"
    )
    assert server.trace_id == trace_id
    assert attributes(server)["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert server.status.code == ERROR
    spans = await wait_for_trace(receiver, trace_id, {GENERATE, "route"})
    attempt = spans[engine_span_name(spans)]
    assert attempt.status.code == ERROR
    assert [e.name for e in attempt.events] == ["first_token"]


async def test_unsampled_client_trace_exports_nothing_but_keeps_its_trace_id(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    """The default sampler (parentbased_always_on) follows the client's
    sampled flag: 00 means no span of that trace is recorded anywhere."""
    receiver, _ = otlp_receiver
    unsampled, sampled = os.urandom(16).hex(), os.urandom(16).hex()
    for trace_id, flags in ((unsampled, "00"), (sampled, "01")):
        call = generate.Generate(
            request("sampling", 2, data_parallel_rank=0),
            metadata=(("traceparent", f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"),),
        )
        _ = [r async for r in call]
        assert dict(await call.initial_metadata())["x-trace-id"] == trace_id
    # The sampled request's spans, engine's included, came after the other's would have.
    await wait_for_trace(receiver, bytes.fromhex(sampled), {GENERATE, "llm_request"})
    assert in_trace(receiver, bytes.fromhex(unsampled)) == {}


class _HttpReceiver(BaseHTTPRequestHandler):
    """OTLP/HTTP (protobuf) on POST /v1/traces; keeps the span names."""

    names: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        exported = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        if self.path == "/v1/traces":
            for resource_spans in exported.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.names.extend(s.name for s in scope_spans.spans)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_receiver() -> Iterator[tuple[type[_HttpReceiver], int]]:
    server = HTTPServer(("127.0.0.1", 0), _HttpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _HttpReceiver.names = []
    yield _HttpReceiver, server.server_port
    server.shutdown()


def test_otlp_over_http_follows_the_standard_variables(
    http_receiver: tuple[type[_HttpReceiver], int],
) -> None:
    """The router's tracing set up in a process of its own (no engines) with
    OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and a base endpoint: the real
    HTTP exporter posts to <endpoint>/v1/traces."""
    receiver, port = http_receiver
    script = (
        "import grpc\n"
        "from router import otlp, tracing\n"
        "assert otlp.setup()\n"
        "print(otlp.traces_endpoint())\n"
        "tracing.start('over-http', (), 'm').end(grpc.StatusCode.OK, '', {})\n"
        "otlp.shutdown()\n"
    )
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"http://127.0.0.1:{port}/v1/traces"
    assert receiver.names == ["over-http"]


async def test_watchdog_probes_leave_no_traces(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, otlp_receiver: tuple[OtlpReceiver, int]
) -> None:
    """While a rank has a request, the watchdog runs a one-token probe on it
    every second; vLLM would make each a trace of its own (an `llm_request`
    root)."""
    receiver, _ = otlp_receiver
    call = generate.Generate(request("keep rank 1 busy", LONG_TOKENS, data_parallel_rank=1))
    busy_until = time.monotonic() + 3  # three rounds of probes, at least
    async for _ in call:
        if time.monotonic() > busy_until:
            break
    call.cancel()
    await asyncio.sleep(2)  # exported by now
    roots = [s for s in receiver.spans() if s.name == "llm_request" and not s.parent_span_id]
    assert roots == []

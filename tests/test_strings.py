"""Any text in any string field of a request ends as OK or as INVALID_ARGUMENT
naming the field, and the router counts the status its client saw; a prompt
too long in bytes for the context is refused before it is tokenized. The
session cluster, and the longest token of real and built tokenizers."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import grpc
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from dprouter.v1 import generate_pb2, generate_pb2_grpc
from router.vllm_compat import longest_token_bytes
from tests.conftest import ROOT
from tests.test_bad_input import expect_invalid
from tests.test_metrics import scrape

S = generate_pb2.SamplingParams
R = generate_pb2.GenerateRequest
M = generate_pb2.ChatMessage
SERVICE = "dprouter.v1.GenerateService"

TEXTS = {
    "emoji": "😀👩\u200d💻",
    "CJK": "日本語の中文",
    "RTL": "שלום مرحبا\u202e",
    "combining marks": "e\u0301a\u0308\u0323",
    "replacement character": "\ufffd",
    "newline": "\n",
    "carriage return": "\r",
    "tab": "\t",
    "NUL": "\x00",
    "DEL": "\x7f",
    "escape": "\x1b[31m",
}


def with_text(field: str, text: str) -> generate_pb2.GenerateRequest:
    """A short greedy request with `text` in `field` (the field's path)."""
    sampling = S(max_tokens=2, temperature=0)
    if field == "prompt":
        return R(prompt=f"a{text}b", sampling=sampling)
    if field == "request_id":
        return R(prompt="a", request_id=f"id-{text}", sampling=sampling)
    if field == "session_key":
        return R(prompt="a", session_key=text, sampling=sampling)
    if field == "messages[0].role":
        return R(messages=[M(role=f"u{text}", content="a")], sampling=sampling)
    if field == "messages[0].content":
        return R(messages=[M(role="user", content=f"a{text}b")], sampling=sampling)
    assert field == "sampling.stop[0]"
    return R(prompt="a", sampling=S(max_tokens=2, temperature=0, stop=[text]))


async def status_of(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, method: str, request: R
) -> tuple[grpc.StatusCode, str]:
    try:
        if method == "Generate":
            _ = [r async for r in generate.Generate(request)]
        else:
            await generate.Complete(generate_pb2.CompleteRequest(request=request))
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def counted(metrics_url: str) -> collections.Counter[tuple[str, str]]:
    """The router's finished RPCs so far, by (method, status)."""
    return collections.Counter(
        {
            (dict(labels)["method"], dict(labels)["code"]): int(n)
            for (name, labels), n in (await scrape(metrics_url)).items()
            if name == "dprouter_requests_total"
        }
    )


@pytest.mark.parametrize(
    "field",
    [
        "prompt",
        "request_id",
        "session_key",
        "messages[0].role",
        "messages[0].content",
        "sampling.stop[0]",
    ],
)
async def test_any_text_in_any_string_field(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub, metrics_url: str, field: str
) -> None:
    """Only the request id, which goes back in response metadata, is held
    to printable ASCII; the rest reach the tokenizer, the engine or the
    traces, which take any text. A request id with a newline once ended as
    INTERNAL at the client ("Invalid metadata") and as CANCELLED in the
    router's metrics, traces and logs."""
    before = await counted(metrics_url)
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, text in TEXTS.items():
        for method in ("Generate", "Complete"):
            code, details = await status_of(generate, method, with_text(field, text))
            seen[(f"{SERVICE}/{method}", code.name)] += 1
            if field == "request_id":
                prefix = "" if method == "Generate" else "request."
                at = 3 + next(i for i, c in enumerate(text) if not " " <= c <= "~")
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, method, details)
                assert details.startswith(f"{prefix}request_id: character {at} is "), details
            else:
                assert code == grpc.StatusCode.OK, (name, method, code, details)
    assert await counted(metrics_url) - before == seen


async def test_a_4_mb_prompt_is_refused_before_it_is_tokenized(
    generate: generate_pb2_grpc.GenerateServiceAsyncStub,
) -> None:
    """Just under gRPC's 4 MiB message limit: tokenizing it took 2-3 s."""
    size = 4 * 1024 * 1024 - 1024
    for field, request in [
        ("prompt", R(prompt="hello " * (size // 6))),
        ("messages", R(messages=[M(role="user", content="日本語" * (size // 9))])),
    ]:
        assert len(request.SerializeToString()) < 4 * 1024 * 1024
        started = time.monotonic()
        await expect_invalid(generate.Generate(request), field)
        assert time.monotonic() - started < 1.0, field


MODELS = [ROOT / "models" / "tiny-llama", ROOT / "models" / "smollm2-135m-instruct"]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_longest_token_of_byte_level_vocabularies(model: Path) -> None:
    """Each character of a byte-level vocabulary string is one byte (GPT-2's
    table); added tokens are their own text."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    table: dict[int, str] = bytes_to_unicode()  # type: ignore[no-untyped-call]
    byte_of = {char: byte for byte, char in table.items()}
    added = tokenizer.get_added_vocab()

    def size(token: str) -> int:
        return len(token.encode()) if token in added else len(bytes(byte_of[c] for c in token))

    vocab: dict[str, int] = tokenizer.get_vocab()
    assert longest_token_bytes(tokenizer) == max(size(token) for token in vocab)
    # Decoding agrees wherever a token holds whole characters.
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    for token, i in vocab.items():
        text = raw.decode([i], skip_special_tokens=False)
        assert "\ufffd" in text or len(text.encode()) == size(token), token


def sentencepiece(vocab: list[str], specials: bool = True) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE as Llama 2's: "\u2581" for spaces, byte fallback."""
    named = ["<unk>", "<s>", "</s>"] if specials else []
    pieces = [*named, *(f"<0x{b:02X}>" for b in range(256)), *vocab]
    model = models.BPE({piece: i for i, piece in enumerate(pieces)}, [], byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    names = dict(zip(("unk_token", "bos_token", "eos_token"), named, strict=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names)  # type: ignore[no-untyped-call]


def test_longest_token_of_a_sentencepiece_vocabulary() -> None:
    # " 日本語" is 10 bytes; alone, it decodes to 9 (a text's leading space is stripped).
    tokenizer = sentencepiece(["\u2581the", "日本", "\u2581日本語", "ab"])
    assert tokenizer.backend_tokenizer.decode([tokenizer.get_vocab()["\u2581日本語"]]) == "日本語"
    assert longest_token_bytes(tokenizer) == 10
    # Special tokens count their text: a prompt may spell one out.
    assert longest_token_bytes(sentencepiece(["\u2581a", "b"])) == len("<unk>")
    # Byte tokens and short pieces: a character's 4 bytes at least.
    assert longest_token_bytes(sentencepiece(["\u2581a", "b"], specials=False)) == 4

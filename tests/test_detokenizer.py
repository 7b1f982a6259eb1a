"""The router's detokenizer priming (`primed_decode_stream`), on the real
tokenizers of both models: the prompt's tail gives the text that priming
with the whole prompt gives, at every point a prompt can end."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from router.vllm_compat import DETOKENIZER_PROMPT_TAIL, primed_decode_stream
from tests.conftest import ROOT

MODELS = [ROOT / "models" / "tiny-llama", ROOT / "models" / "smollm2-135m-instruct"]
# Byte-split characters (accents, CJK, emoji), runs of spaces, code, digits.
TEXT = (
    "The capital of France is Paris.  Größe und Straße; naïve café.\n"
    "日本語のテキストと中文。 🌶️🔥 emoji 👩‍💻 and ZWJ.\n"
    "def f(x):\n    return x ** 2  # 42\n\t\tTabs, 3.14159, ½ ≠ ∞.\n"
) * 3


def deltas(stream: DecodeStream, tokenizer: Tokenizer, output: Sequence[int]) -> list[str]:
    return [stream.step(tokenizer, token) or "" for token in output]


def stepped_in(tokenizer: Tokenizer, prompt: Sequence[int], skip: bool) -> DecodeStream:
    """The reference: a stream primed by stepping through the whole prompt."""
    stream = DecodeStream(skip_special_tokens=skip)
    for token in prompt:
        stream.step(tokenizer, token)
    return stream


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_the_prompt_tail_gives_the_text_of_the_whole_prompt(
    model: Path, skip_special_tokens: bool
) -> None:
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    special = [tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "</s>")]
    ids[40:40] = [t for t in special if t is not None]
    assert len(ids) > 3 * DETOKENIZER_PROMPT_TAIL
    cut_characters = 0
    for end in range(1, len(ids) - 8):
        prompt, output = ids[:end], ids[end : end + 8]
        primed = primed_decode_stream(tokenizer, prompt, skip_special_tokens)
        got = deltas(primed, tokenizer, output)
        want = deltas(stepped_in(tokenizer, prompt, skip_special_tokens), tokenizer, output)
        assert got == want, (end, got, want)
        if tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            cut_characters += 1
        else:  # vLLM's own priming agrees where the prompt ends on a whole character
            whole = DecodeStream(ids=prompt, skip_special_tokens=skip_special_tokens)
            assert deltas(whole, tokenizer, output) == want, end
    assert cut_characters > 0  # prompts that end mid-character were covered

"""How many bytes of text one token can stand for: the bound on a prompt's
bytes before it is tokenized."""

from __future__ import annotations

from typing import Any

import tokenizers

# A character is at most 4 UTF-8 bytes, and a tokenizer that has no token for
# one (SentencePiece's <unk>) still spends a token on it.
_MIN_TOKEN_BYTES = 4


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text that one token of the tokenizer stands
    for, at least 4.

    Added tokens (special ones too: a prompt may spell them out) count their
    text. In byte-level BPE (GPT-2, Llama 3, Qwen), a vocabulary string spells
    one byte per character, so its length is exact; decoding the token would
    not be, as one with part of a character decodes to U+FFFD (3 bytes). Other
    vocabularies (SentencePiece) are decoded, each token twice over and
    halved: alone, a token is the start of a text, whose leading space the
    decoder strips ("\u2581the" decodes to "the"). On built vocabularies of
    150,000 tokens this took 0.06 s (byte-level) and 0.5 s (SentencePiece)
    on a 2-core host; SmolLM2's 49,152 tokens, 0.01 s."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    added: dict[str, int] = tokenizer.get_added_vocab()
    longest = max((len(text.encode()) for text in added), default=0)
    regular = {token: i for token, i in vocab.items() if token not in added}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = None if backend is None else backend.decoder
    if decoder is not None and b'"ByteLevel"' in decoder.__getstate__():
        alphabet = frozenset(tokenizers.pre_tokenizers.ByteLevel.alphabet())
        # A token with a character outside the alphabet decodes as its own UTF-8.
        spelled = (len(t) if alphabet.issuperset(t) else len(t.encode()) for t in regular)
        longest = max(longest, max(spelled, default=0))
    elif regular:
        twice = [[i, i] for i in regular.values()]
        if backend is not None:
            texts: list[str] = backend.decode_batch(twice, skip_special_tokens=False)
        else:
            texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in twice]
        longest = max(longest, max((len(text.encode()) + 1) // 2 for text in texts))
    return max(_MIN_TOKEN_BYTES, longest)

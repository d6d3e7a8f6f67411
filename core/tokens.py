"""How many tokens a text costs in a chat model's prompt, estimated where the model's tokenizer is not at hand.

No chat model's tokenizer ships with the companion (tiktoken downloads its vocabularies when first used, which these
machines may not do), so prompts are budgeted with an estimate shaped like the byte-pair encoders of GPT models:
the text is cut as they cut it before merging (words with their leading space, digits in threes, runs of
punctuation, whitespace), a common English word is one token and a longer one a token per six letters, other
scripts a token per two letters (one per character for Chinese and Japanese), punctuation a token per two marks.
Against the byte-pair tokenizer of the embedded model (SmolLM2, 49k tokens, asked through llama.cpp's /tokenize) on
40 stretches of LoCoMo conversation, it counts 1.01 to 1.16 times as many (1.07 on average; 1.03 for quoted text):
a budget in these tokens holds at most that many of the model's. That tokenizer splits Russian, Japanese and German
finer than this estimate does (38, 26 and 18 tokens where it counts 26, 15 and 12).
"""

from __future__ import annotations

import math
import re

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

"""Shared constants and helpers of the data-pipeline tests (imported by conftest and tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "examples" / "data" / "sample.jsonl"

# Mixed Korean/English text with newlines, tabs, space runs and emoji.
MIXED_TEXTS = [
    "대한민국은 민주공화국이다.\nThe Republic of Korea is a democratic republic.",
    "탭\t다음\t\t두 개, spaces:  two,   three,    four.",
    "  leading and trailing  ",
    "이모지 😀👍🏽 👨‍👩‍👧 🇰🇷 ☕ and English mixed 한글English123456 ㅋㅋㅋ ㅠㅠ",
    "줄\n\n빈 줄 다음\r\nCRLF 줄\n",
    "<|im_start|>user\n안녕하세요?<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
    "=================\n-----\n....... 1234567890 ①②③ ＡＢＣ　전각",
    "def f(x):\n    return {'키': x}  # 주석\n",
]


def sample_docs(n: int = 1000) -> List[str]:
    """The first ``n`` documents of the bundled sample."""
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:n]

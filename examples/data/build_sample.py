"""Rebuild ``examples/data/sample.jsonl`` from its public sources (see PROVENANCE.md).

Usage::

    pip download --no-deps konlpy==0.6.0 -d /tmp/konlpy
    unzip -o /tmp/konlpy/konlpy-0.6.0-py2.py3-none-any.whl 'konlpy/data/corpus/*' -d /tmp/konlpy
    python examples/data/build_sample.py --konlpy-corpus /tmp/konlpy/konlpy/data/corpus

The English part comes from ``pydoc_data.topics`` of the running Python, so the output
depends on the Python version (the committed file was built with CPython 3.11.7).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Iterator, Tuple

# An article line of the constitution: "  제12조 ① ..." (leading spaces vary).
_ARTICLE = re.compile(r"^\s*(제\d+조)\s")
# A chapter / section heading: "       제1장 총강", "       제1절 대통령".
_HEADING = re.compile(r"^\s*제\d+[장절]\s")
# The supplementary provisions start with a line mentioning 부칙.
_ADDENDA = re.compile(r"부칙")
# A pydoc topic section starts after a blank line with a title underlined by = or *.
_PYDOC_SECTION = re.compile(r"\n\n(?=[^\n]+\n[=*]{3,}\n)")


def constitution_docs(path: Path) -> Iterator[Tuple[str, str]]:
    """Yield (text, source) per article of the Korean Constitution, plus the preamble.

    Articles keep their "제N조" prefix so later stages (SFT Q&A) can find them; the
    supplementary provisions (부칙) restart numbering, so their source says 부칙.
    """
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    name = "kolaw/constitution.txt"
    current_id, current, in_addenda, preamble, articles = None, [], False, [], []

    def flush():
        if current_id and current:
            prefix = "부칙 " if in_addenda else ""
            articles.append(("\n".join(current).strip(), f"{name}#{prefix}{current_id}"))

    for line in lines:
        if _ADDENDA.search(line) and not _ARTICLE.match(line):
            flush()
            current_id, current, in_addenda = None, [], True
            continue
        if _HEADING.match(line):
            flush()
            current_id, current = None, []
            continue
        match = _ARTICLE.match(line)
        if match:
            flush()
            current_id, current = match.group(1), [line.strip()]
        elif current_id:
            current.append(line.rstrip())
        else:
            preamble.append(line.rstrip())
    flush()
    text = "\n".join(preamble).strip()
    if text:  # the preamble (전문) comes first, as in the document
        yield text, f"{name}#전문"
    yield from articles


def bill_docs(directory: Path) -> Iterator[Tuple[str, str]]:
    """Yield (text, source) for each National Assembly bill file, layout kept as is."""
    for path in sorted(directory.glob("*.txt")):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
        if text:
            yield text, f"kobill/{path.name}"


def pydoc_docs() -> Iterator[Tuple[str, str]]:
    """Yield (text, source) per section of each topic in Python's pydoc_data."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for i, part in enumerate(_PYDOC_SECTION.split(topics[key])):
            part = part.strip()
            if part:
                yield part, f"pydoc_data/topics.py#{key}/{i}"


def main() -> None:
    """Write sample.jsonl next to this script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--konlpy-corpus",
        required=True,
        type=Path,
        help="the konlpy/data/corpus directory unpacked from the konlpy wheel",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("sample.jsonl"))
    args = parser.parse_args()
    docs = list(constitution_docs(args.konlpy_corpus / "kolaw" / "constitution.txt"))
    docs += list(bill_docs(args.konlpy_corpus / "kobill"))
    docs += list(pydoc_docs())
    with open(args.output, "w", encoding="utf-8", newline="\n") as out:
        for text, source in docs:
            out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents to {args.output}")


if __name__ == "__main__":
    main()

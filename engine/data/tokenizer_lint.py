"""Tokenizer lint: does text survive the tokenizer, and at what cost?

Run before any data is tokenized (the seed run trained on data whose newlines were all
``<unk>``). Checks, on a sample and on fixed probes:

- round trip: ``decode(encode(x)) == x`` (exact) and ``== normalize(x)`` (up to the
  tokenizer's declared normalization, e.g. NFKC turning "①" into "1"). Losing text
  beyond the declared normalization is a failure; normalization changes are listed.
- ``<unk>`` rate; any ``<unk>`` from a byte-fallback model is a failure (it means the
  byte pieces are missing or broken).
- which of newline / tab / double space / emoji / Hangul jamo survive exactly.
- Korean coverage: the share of Hangul syllables in the sample encoded without byte
  fallback, and how many of the 2,350 common syllables (KS X 1001) are single pieces.
- tokens per character.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from engine.data.tokenizer import Tokenizer

PROBES: Dict[str, str] = {
    "newline": "첫째 줄\n둘째 line\n\nthird",
    "tab": "col1\tcol2\t\t열3",
    "double space": "two  spaces,   three and    four",
    "leading/trailing space": "  indented text  ",
    "emoji": "좋아요 👍🏽 family 👨‍👩‍👧 flag 🇰🇷 ☕",
    "hangul jamo": "ㅋㅋㅋ ㅠㅠ ㅎㅎ ㄱㄴㄷ ㅏㅑ",
    "mixed ko/en": "제1조 대한민국은 민주공화국이다. The Republic of Korea is a democratic republic.\r\n",
    "code": "def f(x):\n    return {'a': x}  # 주석\n",
}
MAX_EXAMPLES = 5


def _hangul_syllable(ch: str) -> bool:
    return 0xAC00 <= ord(ch) <= 0xD7A3


def common_hangul_syllables() -> List[str]:
    """The 2,350 precomposed Hangul syllables of KS X 1001.

    Python's EUC-KR codec writes those as 2 bytes and the other syllables as 8-byte
    jamo compositions, which tells them apart.
    """
    return [chr(o) for o in range(0xAC00, 0xD7A4) if len(chr(o).encode("euc-kr")) == 2]


def _normalized(tok: Tokenizer, text: str) -> str:
    """``text`` after the tokenizer's own normalization (spaces unescaped)."""
    return tok.processor.normalize(text).replace("\u2581", " ")


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {i}: expected {a[i : i + 12]!r}, got {b[i : i + 12]!r}"


def lint_tokenizer(tok: Tokenizer, samples: Iterable[str], max_docs: int = 1000) -> dict:
    """Run every check; returns a report dict whose ``ok`` says whether the lint passed."""
    byte_fallback = tok.is_byte_fallback()
    sp = tok.processor
    docs = [s for s in itertools.islice(samples, max_docs) if s]
    report: dict = {
        "byte_fallback": byte_fallback,
        "vocab_size": tok.vocab_size,
        "trained_vocab_size": tok.trained_vocab_size,
        "sha256": tok.sha256,
    }
    failures: List[str] = []

    # --- sample round trips, unk rate, tokens per char, Hangul coverage ---------------
    exact = normalized_ok = tokens = chars = unks = 0
    lost: List[str] = []
    norm_changes: Counter = Counter()
    hangul_total = hangul_fallback = 0
    byte_ids = {i for i in range(tok.trained_vocab_size) if sp.is_byte(i)} if byte_fallback else set()
    for text in docs:
        ids = tok.encode(text)
        back = tok.decode(ids)
        tokens += len(ids)
        chars += len(text)
        unks += sum(1 for i in ids if i == tok.unk)
        if back == text:
            exact += 1
            normalized_ok += 1
        else:
            norm = _normalized(tok, text)
            if back == norm:
                normalized_ok += 1
                for a, b in zip(text, norm) if len(text) == len(norm) else []:
                    if a != b:
                        norm_changes[f"{a}->{b}"] += 1
                if len(text) != len(norm):
                    norm_changes["(length-changing rules)"] += 1
            elif len(lost) < MAX_EXAMPLES:
                lost.append(_first_difference(norm, back))
    # Hangul syllables that needed byte pieces (or <unk>): encode each distinct one once.
    counts = Counter(ch for text in docs for ch in text if _hangul_syllable(ch))
    hangul_total = sum(counts.values())
    for ch, n in counts.items():
        if any(i in byte_ids or i == tok.unk for i in tok.encode(ch)):
            hangul_fallback += n
    n = len(docs)
    report["sample"] = {
        "documents": n,
        "characters": chars,
        "tokens": tokens,
        "tokens_per_char": round(tokens / chars, 4) if chars else None,
        "exact_round_trip": f"{exact}/{n}",
        "round_trip_up_to_normalization": f"{normalized_ok}/{n}",
        "lost_text_examples": lost,
        "normalization_changes": dict(norm_changes.most_common(8)),
        "unk_tokens": unks,
        "unk_rate": round(unks / tokens, 6) if tokens else 0.0,
        "hangul_syllables": hangul_total,
        "hangul_covered_without_fallback": (round(1 - hangul_fallback / hangul_total, 4) if hangul_total else None),
    }
    if normalized_ok < n:
        failures.append(f"{n - normalized_ok} of {n} sample documents lose text in a round trip")
    if byte_fallback and unks:
        failures.append(f"{unks} <unk> tokens from a byte-fallback model")

    # --- probes -------------------------------------------------------------------------
    probes = {}
    for name, text in PROBES.items():
        ids = tok.encode(text)
        back = tok.decode(ids)
        survived = back == text
        up_to_norm = survived or back == _normalized(tok, text)
        probes[name] = {
            "exact": survived,
            "up_to_normalization": up_to_norm,
            "tokens": len(ids),
            "unk": sum(1 for i in ids if i == tok.unk),
        }
        if not up_to_norm:
            failures.append(f"probe {name!r} does not survive a round trip: {_first_difference(text, back)}")
        elif byte_fallback and probes[name]["unk"]:
            failures.append(f"probe {name!r} produced <unk>")
    report["probes"] = probes

    # --- vocabulary coverage of common Hangul ------------------------------------------------
    common = common_hangul_syllables()
    single = sum(1 for ch in common if tok.token_to_id(ch) is not None)
    report["common_hangul_single_pieces"] = f"{single}/{len(common)}"

    report["failures"] = failures
    report["ok"] = not failures
    return report


def format_report(report: dict) -> str:
    """Human-readable lint report."""
    s = report["sample"]
    lines = [
        f"tokenizer lint  sha256={report['sha256'][:16]}  vocab={report['vocab_size']} "
        f"(trained {report['trained_vocab_size']})  byte_fallback={report['byte_fallback']}",
        f"  sample documents             {s['documents']}  ({s['characters']} chars, {s['tokens']} tokens)",
        f"  tokens per character         {s['tokens_per_char']}",
        f"  exact round trip             {s['exact_round_trip']}",
        f"  round trip up to normalizer  {s['round_trip_up_to_normalization']}",
        f"  <unk> rate                   {s['unk_rate']}  ({s['unk_tokens']} tokens)",
        f"  Hangul covered w/o fallback  {s['hangul_covered_without_fallback']}  ({s['hangul_syllables']} syllables)",
        f"  common Hangul single pieces  {report['common_hangul_single_pieces']}",
    ]
    if s["normalization_changes"]:
        changes = ", ".join(f"{k} x{v}" for k, v in s["normalization_changes"].items())
        lines.append(f"  normalization changed        {changes}")
    for ex in s["lost_text_examples"]:
        lines.append(f"  LOST TEXT {ex}")
    lines.append("  probe                    exact  up-to-norm  tokens  unk")
    for name, p in report["probes"].items():
        lines.append(
            f"  {name:<24} {'yes' if p['exact'] else 'NO ':<6} {'yes' if p['up_to_normalization'] else 'NO':<11} "
            f"{p['tokens']:>6}  {p['unk']:>3}"
        )
    if report["failures"]:
        lines.append("FAILED:")
        lines += [f"  - {f}" for f in report["failures"]]
    else:
        lines.append("OK")
    return "\n".join(lines)


def default_sample_path() -> Optional[Path]:
    """The bundled sample corpus when running from a source checkout, else None."""
    path = Path(__file__).resolve().parents[2] / "examples" / "data" / "sample.jsonl"
    return path if path.is_file() else None


def load_samples(inputs: Sequence[str], json_key: str = "text", max_docs: int = 1000) -> List[str]:
    """Up to ``max_docs`` documents from ``inputs`` (bad records skipped)."""
    from engine.data import readers

    files = readers.expand_inputs(inputs)
    return list(itertools.islice(readers.iter_documents(files, json_key, skip_bad=True), max_docs))

"""Build real SFT and preference data from the bundled corpus: the articles of the Korean Constitution.

From ``examples/data/sample.jsonl`` (provenance in ``examples/data/PROVENANCE.md``) it
takes the documents whose ``source`` is ``kolaw/constitution.txt#제N조`` and writes

  * ``sft.jsonl``: "what does Article N say?" -> the article's text (its first paragraph
    by default, so that tiny CPU runs fit), alternating Alpaca records (``instruction`` /
    ``input`` / ``output``) and ``messages`` records (with a system message; every third
    one is a two-turn conversation about two articles);
  * ``preference.jsonl``: ``{prompt, chosen, rejected}`` with the same question, the
    article's text as the chosen answer and another article's text as the rejected one,
    drawn (seeded) from a pool of distractor articles (``--distractors``, 25%) that are
    never asked about. With ``data.split: 80,20,0`` the last 20% of the pairs are held
    out; their accuracy rises when ORPO learns that distractor texts are bad answers.

Usage: python examples/make_post_training_data.py --out-dir DIR [--sample FILE.jsonl] [--max-chars 160] [--seed 0] [--distractors 0.25]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "data" / "sample.jsonl"
ARTICLE = re.compile(r"^kolaw/constitution\.txt#제(\d+)조$")
SYSTEM = "당신은 대한민국헌법을 정확히 인용하는 도우미입니다."


def load_articles(sample: Path = SAMPLE, max_chars: int = 160):
    """[(article number, text)] of the constitution's main articles, in order."""
    out = []
    for line in sample.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        m = ARTICLE.match(rec.get("source", ""))
        if not m:
            continue
        text = rec["text"].split("\n")[0].strip()  # the article number and its first paragraph
        out.append((int(m.group(1)), text[:max_chars]))
    return out


def question(n: int) -> str:
    return f"대한민국헌법 제{n}조의 내용은 무엇입니까?"


def sft_records(articles):
    """Alpaca and messages-form SFT records, one or two articles each."""
    for i, (n, text) in enumerate(articles):
        if i % 2 == 0:
            yield {"instruction": "다음 헌법 조문의 내용을 인용하시오.", "input": f"제{n}조", "output": text}
        elif i % 3 == 0 and i + 1 < len(articles):
            n2, text2 = articles[i + 1]
            yield {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question(n)},
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": question(n2)},
                    {"role": "assistant", "content": text2},
                ]
            }
        else:
            yield {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": question(n)},
                    {"role": "assistant", "content": text},
                ]
            }


def preference_records(articles, distractors, seed: int = 0):
    """One pair per article: its own text (chosen) against a distractor article's (rejected).

    Distractor articles are never the right answer to any question (and never an SFT
    answer), so what ORPO learns from the training pairs, that these texts are bad answers,
    carries over to held-out pairs: their accuracy measures generalisation, not memorised
    pairs. (With rejected answers drawn from the asked-about articles, a held-out article's
    text gets pushed down as some training pair's rejected answer, and held-out accuracy
    falls; a CPU-sized model does not learn to match article numbers in a few steps.)"""
    rng = random.Random(seed)
    for n, text in articles:
        yield {"prompt": question(n), "chosen": text, "rejected": distractors[rng.randrange(len(distractors))][1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--sample", default=str(SAMPLE), help="JSONL corpus holding the constitution's articles")
    ap.add_argument("--max-chars", type=int, default=160, help="cut each article's text to this many characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--distractors", type=float, default=0.25, help="share of the articles used only as rejected answers"
    )
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    articles = load_articles(Path(args.sample), max_chars=args.max_chars)
    if len(articles) < 4:
        raise SystemExit(f"error: {args.sample} holds {len(articles)} constitution articles; at least 4 are needed")
    # Shuffle the pairs (seeded) so that the held-out split is a spread of articles.
    order = list(range(len(articles)))
    random.Random(args.seed).shuffle(order)
    shuffled = [articles[k] for k in order]
    cut = len(shuffled) - int(round(args.distractors * len(shuffled)))
    asked, distractors = shuffled[:cut], shuffled[cut:]
    for name, records in (
        ("sft.jsonl", sft_records(asked)),
        ("preference.jsonl", preference_records(asked, distractors, args.seed)),
    ):
        with open(out / name, "w", encoding="utf-8") as f:
            n = 0
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        print(f"wrote {out / name}: {n} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation results as Markdown tables, JSON files and the sweep plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from engine.evaluation.generation_metrics import NGRAM_ORDERS


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def perplexity_table(result: Dict[str, Any]) -> str:
    """One row per dataset of one checkpoint's evaluation."""
    rows = [
        [p["name"], p["split"], str(p["seq_length"]), str(p["tokens"]), _fmt(p["mean_nll"], 4), _fmt(p["perplexity"])]
        for p in result["perplexity"]
    ]
    return table(["dataset", "split", "window", "tokens", "mean NLL", "perplexity"], rows)


def generation_table(stats: Dict[str, Any]) -> str:
    """The generation metrics of one checkpoint."""
    header = ["generations", *(f"{n}-gram rep." for n in NGRAM_ORDERS), "EOS rate", "mean length"]
    row = [
        str(stats["generations"]),
        *(_pct(stats[f"repetition_{n}gram"]) for n in NGRAM_ORDERS),
        _pct(stats["eos_rate"]),
        _fmt(stats["mean_length"], 1),
    ]
    return table(header, [row])


def eval_markdown(result: Dict[str, Any]) -> str:
    """The report of one checkpoint."""
    parts = [f"## {result['checkpoint']} (iteration {result['iteration']})", "", perplexity_table(result)]
    if result.get("generation"):
        parts += ["", "Greedy generations:", "", generation_table(result["generation"])]
    return "\n".join(parts) + "\n"


def compare_markdown(comparison: Dict[str, Any]) -> str:
    """Per-dataset perplexity of A and B and the change (B relative to A)."""
    a, b = comparison["a"], comparison["b"]
    rows = [[r["name"], _fmt(r["ppl_a"]), _fmt(r["ppl_b"]), f"{100 * r['change']:+.2f}%"] for r in comparison["change"]]
    parts = [
        f"A: {a['checkpoint']} (iteration {a['iteration']})",
        f"B: {b['checkpoint']} (iteration {b['iteration']})",
        "",
        table(["dataset", "perplexity A", "perplexity B", "change (B vs A)"], rows),
    ]
    if a.get("generation") and b.get("generation"):
        parts += ["", "Greedy generations, A then B:", "", generation_table(a["generation"])]
        parts += ["", generation_table(b["generation"])]
    return "\n".join(parts) + "\n"


def sweep_rows(sweep: Dict[str, Any]) -> List[List[str]]:
    """One row per checkpoint: iteration, then each dataset's perplexity."""
    return [[str(r["iteration"]), *(_fmt(p["perplexity"]) for p in r["perplexity"])] for r in sweep["checkpoints"]]


def sweep_markdown(sweep: Dict[str, Any]) -> str:
    """Perplexity per dataset (columns) of every checkpoint (rows)."""
    first = sweep["checkpoints"][0]["perplexity"]
    header = ["iteration", *(f"{p['name']} ppl ({p['split']})" for p in first)]
    return f"Run {sweep['run_dir']}\n\n" + table(header, sweep_rows(sweep)) + "\n"


def sweep_plot(sweep: Dict[str, Any], path: Path) -> None:
    """PNG: perplexity against iteration, one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ckpts = sweep["checkpoints"]
    iterations = [r["iteration"] for r in ckpts]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, p in enumerate(ckpts[0]["perplexity"]):
        ax.plot(iterations, [r["perplexity"][i]["perplexity"] for r in ckpts], marker="o", label=p["name"])
    split = ckpts[0]["perplexity"][0]["split"]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole steps
    ax.set_xlabel("training iteration")
    ax.set_ylabel(f"perplexity ({split} split, window {ckpts[0]['perplexity'][0]['seq_length']})")
    ax.set_title(f"Perplexity over training: {Path(sweep['run_dir']).name}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="dataset")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(out_dir: Path, stem: str, data: Dict[str, Any], markdown: str) -> List[Path]:
    """``out_dir/stem.json`` and ``out_dir/stem.md``; returns their paths."""
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_atomic(js, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    write_atomic(md, markdown)
    return [js, md]

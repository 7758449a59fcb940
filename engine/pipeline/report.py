"""The pipeline's report: ``report.json`` (the figures, for tests and tools), ``report.md`` (with
PNG plots next to it) and a self-contained ``report.html`` (the same plots embedded as base64).

It shows the loss curves of every training stage (train and validation), ORPO's held-out
preference accuracy and margin over steps, the realised replay share, the export's parity
figure, the perplexity table across stages, sample generations before and after ORPO, each
stage's resolved config and the exact command lines that rerun it.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from engine.pipeline.config import PipelineConfig
from engine.pipeline.runner import Stage, StageFailed
from engine.pipeline.stages import Layout, eval_results, gguf_path, read_jsonl, read_metrics

TRAIN_STAGES = ("pretrain", "sft", "orpo")


def _finite(x: Any) -> Optional[float]:
    """JSON-safe float: NaN/Inf become None (json would write invalid NaN literals)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def training_data(lay: Layout) -> Dict[str, Dict[str, Any]]:
    """Per training stage: train and validation loss curves, tok/s, replay share, ORPO accuracy/margin."""
    data: Dict[str, Dict[str, Any]] = {}
    for name in TRAIN_STAGES:
        rows, valid = read_metrics(lay.run(name)), read_metrics(lay.run(name), "valid")
        if not rows:
            continue
        entry: Dict[str, Any] = {
            "train_loss": [[r["step"], _finite(r["loss"])] for r in rows],
            "valid_loss": [[r["step"], _finite(r["loss"])] for r in valid],
            "tokens_per_s": [[r["step"], _finite(r.get("tokens_per_s"))] for r in rows],
        }
        share_key = next((k for k in rows[-1] if k.startswith("share/replay")), None)
        if share_key:
            entry["replay_share"] = [[r["step"], _finite(r.get(share_key))] for r in rows if share_key in r]
        if valid and "rewards/accuracies" in valid[0]:
            entry["heldout_accuracy"] = [[r["step"], _finite(r["rewards/accuracies"])] for r in valid]
            entry["heldout_margin"] = [[r["step"], _finite(r.get("rewards/margins"))] for r in valid]
        data[name] = entry
    return data


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _plot(path: Path, panels: Sequence[Tuple[str, str, Dict[str, List[List[Any]]]]]) -> Optional[Path]:
    """One PNG of side-by-side panels (title, y label, {series label: [[x, y], ...]})."""
    panels = [p for p in panels if any(p[2].values())]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], panels):
        for label, points in series.items():
            pts = [(x, y) for x, y in points if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 12 else None, markersize=4, label=label)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("step", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(lay: Layout, training: Dict[str, Dict[str, Any]]) -> Dict[str, Path]:
    """The report's PNG plots under ``OUT/plots``: name -> path."""
    plots: Dict[str, Path] = {}
    loss = _plot(
        lay.out / "plots" / "loss.png",
        [
            (f"{name}: loss", "loss", {"train": d["train_loss"], "validation": d["valid_loss"]})
            for name, d in training.items()
        ],
    )
    if loss:
        plots["loss"] = loss
    orpo = training.get("orpo", {})
    pref = _plot(
        lay.out / "plots" / "orpo_heldout.png",
        [
            ("ORPO held-out preference accuracy", "accuracy", {"held-out pairs": orpo.get("heldout_accuracy", [])}),
            (
                "ORPO held-out reward margin",
                "margin (chosen - rejected)",
                {"held-out pairs": orpo.get("heldout_margin", [])},
            ),
        ],
    )
    if pref:
        plots["orpo_heldout"] = pref
    replay = training.get("sft", {}).get("replay_share")
    if replay:
        target = _read_yaml(lay.configs / "sft.yaml").get("data", {}).get("replay_ratio")
        series = {"realised": replay}
        if target:
            series["target"] = [[replay[0][0], target], [replay[-1][0], target]]
        p = _plot(
            lay.out / "plots" / "replay_share.png",
            [("SFT: share of replayed pretraining data", "share of loss tokens", series)],
        )
        if p:
            plots["replay_share"] = p
    return plots


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def gguf_summary(path: Path) -> Optional[Dict[str, Any]]:
    """What gguf's own reader sees in the written file: tensor count, size, key metadata."""
    if not path.is_file():
        return None
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {}
    for key in ("general.architecture", "llama.context_length", "llama.block_count", "tokenizer.ggml.model"):
        f = reader.fields.get(key)
        if f is not None:
            meta[key] = f.contents()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "file": str(path),
        "tensors": len(reader.tensors),
        "mib": path.stat().st_size / 2**20,
        "vocab": len(tokens.data) if tokens is not None else None,
        "metadata": meta,
    }


def generations(lay: Layout) -> List[Dict[str, Any]]:
    """The sample answers, prompt by prompt: SFT (before ORPO) then ORPO."""
    out = []
    for name in ("sft", "orpo"):
        for rec in read_jsonl(lay.generations / f"{name}.jsonl"):
            out.append(
                {"model": name, "prompt": rec["prompt"], "text": rec["text"], "finished_by": rec.get("finished_by")}
            )
    return sorted(out, key=lambda r: r["prompt"])


def evaluation(lay: Layout) -> Optional[Dict[str, Any]]:
    """Perplexity per dataset and stage, its change against pretraining (forgetting) and the
    generation metrics, from the eval command's JSON results."""
    results = eval_results(lay)
    if not results:
        return None
    perplexity: Dict[str, Dict[str, float]] = {}
    for stage, res in results.items():
        for p in res.get("perplexity", []):
            perplexity.setdefault(p["name"], {})[stage] = p["perplexity"]
    base = "pretrain"
    forgetting = {
        ds: {s: (v - by[base]) / by[base] for s, v in by.items() if s != base}
        for ds, by in perplexity.items()
        if base in by and by[base]
    }
    gen = {stage: res.get("generation") for stage, res in results.items() if res.get("generation")}
    return {"perplexity": perplexity, "change_vs_pretrain": forgetting, "generation": gen}


def collect(
    cfg: PipelineConfig,
    lay: Layout,
    stages: Sequence[Stage],
    results: Dict[str, Dict[str, Any]],
    elapsed: float,
    failed: Optional[StageFailed],
) -> Dict[str, Any]:
    """Everything the report shows, as plain data (``report.json``)."""
    export = _read_json(lay.hf / "engine_export.json")
    return {
        "gguf": gguf_summary(gguf_path(cfg, lay)),
        "generations": generations(lay),
        "evaluation": evaluation(lay),
        "config": {"run": vars(cfg.run)},
        "failed": None if failed is None else {"stage": failed.stage, "error": str(failed), "log": str(failed.log)},
        "seconds": elapsed,
        "stages": {s.name: {"title": s.title, **results.get(s.name, {"status": "not run"})} for s in stages},
        "training": training_data(lay),
        "export": export,
        "stage_configs": {name: _read_yaml(lay.configs / f"{name}.yaml") for name in TRAIN_STAGES},
    }


def _markdown(data: Dict[str, Any], plots: Dict[str, Path], lay: Layout) -> List[Tuple[str, Any]]:
    """The report as a list of blocks: ("h", text), ("p", text), ("table", rows), ("img", name),
    ("pre", text); rendered to Markdown and to HTML by the two writers."""
    blocks: List[Tuple[str, Any]] = [("h1", "Pipeline report")]
    run = data["config"]["run"]
    blocks.append(
        (
            "p",
            f"Corpus `{run['corpus']}`, preset `{run['preset']}`, steps x {run['steps_scale']:g}, "
            f"{run['nproc']} process(es) per training stage; wall time of this invocation {data['seconds']:.0f} s.",
        )
    )
    if data["failed"]:
        blocks.append(("p", f"**Stopped:** {data['failed']['error']}"))
    rows = [["stage", "status", "time (s)", "estimate (s)", "summary"]]
    for name, st in data["stages"].items():
        secs = st.get("seconds")
        rows.append(
            [
                name,
                st.get("status", "not run"),
                "" if secs is None else f"{secs:.0f}",
                f"{st.get('estimate_s', 0):.0f}",
                st.get("summary", ""),
            ]
        )
    measured = sum(st.get("seconds") or 0 for st in data["stages"].values())
    blocks += [("h2", "Stages"), ("table", rows)]
    blocks.append(
        ("p", f"Sum of the stage times, each measured when the stage ran: {measured:.0f} s ({measured / 60:.1f} min).")
    )

    if "loss" in plots:
        blocks += [("h2", "Loss curves (train and validation)"), ("img", "loss")]
    orpo = data["training"].get("orpo", {})
    if orpo.get("heldout_accuracy"):
        acc, margin = orpo["heldout_accuracy"], orpo.get("heldout_margin") or []
        blocks.append(("h2", "ORPO: held-out preference accuracy and margin"))
        blocks.append(
            (
                "p",
                f"Held-out pairs (never trained on): accuracy {acc[0][1]:.3f} at step {acc[0][0]} -> "
                f"{acc[-1][1]:.3f} at step {acc[-1][0]}"
                + (
                    f"; margin {margin[0][1]:.4f} -> {margin[-1][1]:.4f}."
                    if margin and margin[0][1] is not None
                    else "."
                ),
            )
        )
        if "orpo_heldout" in plots:
            blocks.append(("img", "orpo_heldout"))
    replay = data["training"].get("sft", {}).get("replay_share")
    if replay:
        blocks.append(("h2", "Replay during SFT"))
        blocks.append(
            ("p", f"Realised share of replayed pretraining data at the last step: {100 * (replay[-1][1] or 0):.1f}%.")
        )
        if "replay_share" in plots:
            blocks.append(("img", "replay_share"))
    exp = data["export"]
    if exp:
        parity = exp.get("parity") or {}
        blocks.append(("h2", "Hugging Face export"))
        blocks.append(
            (
                "p",
                f"`{lay.hf}`: {exp.get('architecture')} with {exp.get('parameters'):,} parameters at {exp.get('dtype')}, "
                f"from `{exp.get('source', {}).get('checkpoint')}`. Logit parity against the engine "
                f"({parity.get('compute')}, {parity.get('prompt_tokens')} tokens): max |difference| "
                f"{parity.get('max_abs_logit_diff'):.2e} (bound {parity.get('tolerance')}).",
            )
        )
    if data["gguf"]:
        g = data["gguf"]
        blocks.append(("h2", "GGUF"))
        blocks.append(
            (
                "p",
                f"`{g['file']}`: {g['tensors']} tensors, {g['mib']:.1f} MiB, vocabulary {g['vocab']} (read back with gguf's reader).",
            )
        )
    ev = data["evaluation"]
    if ev:
        stages = [s for s in TRAIN_STAGES if any(s in by for by in ev["perplexity"].values())]
        blocks.append(("h2", "Evaluation"))
        blocks.append(("p", "Perplexity on the held-out part of each dataset, per stage's checkpoint:"))
        rows = [["dataset", *stages]]
        rows += [[ds, *(f"{by[s]:.2f}" if s in by else "" for s in stages)] for ds, by in ev["perplexity"].items()]
        blocks.append(("table", rows))
        if ev["change_vs_pretrain"]:
            blocks.append(
                ("p", "Change of perplexity against the pretrained checkpoint (forgetting when > 0 on the corpus):")
            )
            later = [s for s in stages if s != "pretrain"]
            rows = [["dataset", *later]]
            rows += [
                [ds, *(f"{100 * ch[s]:+.1f}%" if s in ch else "" for s in later)]
                for ds, ch in ev["change_vs_pretrain"].items()
            ]
            blocks.append(("table", rows))
        if ev["generation"]:
            blocks.append(("p", "Greedy answers to the evaluation prompts:"))
            orders = sorted(k for k in next(iter(ev["generation"].values())) if k.startswith("repetition_"))
            rows = [
                [
                    "checkpoint",
                    "answers",
                    *(o.replace("repetition_", "") + " repetition" for o in orders),
                    "EOS rate",
                    "mean length",
                ]
            ]
            for stage, g in ev["generation"].items():
                rows.append(
                    [
                        stage,
                        g.get("generations", ""),
                        *(f"{100 * g[o]:.1f}%" if g.get(o) is not None else "n/a" for o in orders),
                        f"{100 * g['eos_rate']:.0f}%" if g.get("eos_rate") is not None else "n/a",
                        f"{g['mean_length']:.1f}" if g.get("mean_length") is not None else "n/a",
                    ]
                )
            blocks.append(("table", rows))
    if data["generations"]:
        blocks.append(("h2", "Sample generations with the chat template: before (SFT) and after ORPO"))
        for g in data["generations"]:
            blocks.append(("p", f"**{g['model']}** ({g['finished_by']}), prompt: {g['prompt']}"))
            blocks.append(("pre", g["text"]))
    blocks.append(("h2", "Commands to rerun each stage (from the repository root)"))
    for name, st in data["stages"].items():
        blocks.append(("p", f"`{name}` (log: `{st.get('log', '')}`)"))
        blocks.append(("pre", "\n".join(st.get("commands", []))))
    blocks.append(("h2", "Resolved configs of the training stages"))
    for name, values in data["stage_configs"].items():
        if values:
            blocks.append(("p", f"`{lay.configs.name}/{name}.yaml`"))
            blocks.append(("pre", yaml.safe_dump(values, sort_keys=False, allow_unicode=True)))
    return blocks


def _to_markdown(blocks: List[Tuple[str, Any]], plots: Dict[str, Path], out: Path) -> str:
    lines: List[str] = []
    for kind, body in blocks:
        if kind == "h1":
            lines.append(f"# {body}\n")
        elif kind == "h2":
            lines.append(f"## {body}\n")
        elif kind == "p":
            lines.append(f"{body}\n")
        elif kind == "pre":
            lines.append(f"```\n{body.rstrip()}\n```\n")
        elif kind == "img":
            lines.append(f"![{body}]({plots[body].relative_to(out)})\n")
        elif kind == "table":
            head, *rest = body
            lines.append("| " + " | ".join(map(str, head)) + " |")
            lines.append("|" + " --- |" * len(head))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rest]
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """HTML of a Markdown line: escaped, with `code` and **bold**."""
    import re

    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _to_html(blocks: List[Tuple[str, Any]], plots: Dict[str, Path]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Pipeline report</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;font-size:16px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "pre{background:#f5f5f5;padding:8px;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}"
        "</style></head><body>"
    ]
    for kind, body in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline(body)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(body)}</p>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(body)}</pre>")
        elif kind == "img":
            b64 = base64.b64encode(plots[body].read_bytes()).decode()
            parts.append(f"<img alt='{body}' src='data:image/png;base64,{b64}'>")
        elif kind == "table":
            head, *rest = body
            parts.append("<table><tr>" + "".join(f"<th>{_inline(str(c))}</th>" for c in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rest]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write(path: Path, text: str) -> None:
    """Write through a temporary sibling: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(
    cfg: PipelineConfig,
    out: Path,
    stages: Sequence[Stage],
    results: Dict[str, Dict[str, Any]],
    elapsed: float,
    failed: Optional[StageFailed],
    config_path: Optional[str] = None,
) -> Path:
    """Write report.json, report.md (+ plots/*.png) and report.html under ``out``; returns report.md."""
    lay = Layout(out)
    lay.out.mkdir(parents=True, exist_ok=True)
    data = collect(cfg, lay, stages, results, elapsed, failed)
    data["config"]["file"] = config_path
    plots = make_plots(lay, data["training"])
    data["plots"] = {k: str(v) for k, v in plots.items()}
    blocks = _markdown(data, plots, lay)
    _write(lay.out / "report.json", json.dumps(data, indent=1, ensure_ascii=False))
    _write(lay.out / "report.md", _to_markdown(blocks, plots, lay.out))
    _write(lay.out / "report.html", _to_html(blocks, plots))
    return lay.out / "report.md"

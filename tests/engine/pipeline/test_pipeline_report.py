"""The report from hand-made stage outputs: curves and figures in report.json, plots embedded
in the self-contained HTML, the forgetting table computed from the per-stage perplexities."""

from __future__ import annotations

import base64
import io
import json
import re

import yaml

from engine.pipeline.config import PipelineConfig
from engine.pipeline.report import write_report
from engine.pipeline.runner import StageFailed
from engine.pipeline.stages import Layout, build_stages


def _metrics(run, train, valid):
    (run / "logs").mkdir(parents=True)
    with open(run / "logs" / "metrics.jsonl", "w") as f:
        for rec in train:
            f.write(json.dumps({"split": "train", **rec}) + "\n")
        for rec in valid:
            f.write(json.dumps({"split": "valid", **rec}) + "\n")


def test_report_from_stage_outputs(tmp_path):
    cfg = PipelineConfig()
    lay = Layout(tmp_path)
    _metrics(
        lay.run("pretrain"),
        [{"step": s, "loss": 8.0 - s, "tokens_per_s": 1e4} for s in (1, 2, 3)],
        [{"step": 3, "loss": 5.5}],
    )
    # a step logged twice (resume): the last record counts
    _metrics(
        lay.run("sft"),
        [
            {"step": 1, "loss": 9.0, "share/replay:pretrain": 0.5},
            {"step": 1, "loss": 6.0, "share/replay:pretrain": 0.31},
        ],
        [],
    )
    valid = [
        {"step": 0, "loss": 7.0, "rewards/accuracies": 0.4, "rewards/margins": -0.02},
        {"step": 2, "loss": 6.0, "rewards/accuracies": 0.7, "rewards/margins": 0.05},
    ]
    _metrics(lay.run("orpo"), [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 6.5}], valid)
    lay.configs.mkdir()
    (lay.configs / "sft.yaml").write_text(yaml.safe_dump({"data": {"replay_ratio": 0.3}}))
    for stage, ppl in (("pretrain", (20.0, 50.0)), ("orpo", (25.0, 10.0))):
        (lay.evaluation / stage).mkdir(parents=True)
        result = {
            "perplexity": [{"name": "pretrain", "perplexity": ppl[0]}, {"name": "sft", "perplexity": ppl[1]}],
            "generation": {"generations": 4, "repetition_3gram": 0.25, "eos_rate": 0.5, "mean_length": 12.0},
        }
        (lay.evaluation / stage / "eval_iter_0000003.json").write_text(json.dumps(result))
    lay.generations.mkdir()
    (lay.generations / "sft.jsonl").write_text(
        json.dumps({"prompt": "제1조?", "text": "<b>before</b>", "finished_by": "length"}) + "\n"
    )
    (lay.generations / "orpo.jsonl").write_text(
        json.dumps({"prompt": "제1조?", "text": "after", "finished_by": "end_of_turn"}) + "\n"
    )

    stages = build_stages(cfg, tmp_path)
    results = {
        "tokenizer": {
            "status": "ran",
            "seconds": 3.0,
            "estimate_s": 5.0,
            "summary": "ok",
            "commands": ["python -m engine tokenizer train"],
        }
    }
    failed = StageFailed("data", "exit 1: error: bad", tmp_path / "logs" / "data.log")
    md = write_report(cfg, tmp_path, stages, results, 12.0, failed, "cfg.yaml")

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"]["stage"] == "data"
    assert report["stages"]["tokenizer"]["status"] == "ran" and report["stages"]["pretrain"]["status"] == "not run"
    tr = report["training"]
    assert tr["pretrain"]["train_loss"] == [[1, 7.0], [2, 6.0], [3, 5.0]]
    assert tr["sft"]["train_loss"] == [[1, 6.0]] and tr["sft"]["replay_share"] == [[1, 0.31]]
    assert tr["orpo"]["train_loss"] == [[1, None], [2, 6.5]]  # NaN: None in JSON, not an invalid literal
    assert tr["orpo"]["heldout_accuracy"] == [[0, 0.4], [2, 0.7]]
    ev = report["evaluation"]
    assert ev["change_vs_pretrain"] == {"pretrain": {"orpo": 0.25}, "sft": {"orpo": -0.8}}
    assert [g["model"] for g in report["generations"]] == ["sft", "orpo"]

    text = md.read_text()
    assert "**Stopped:** stage 'data' failed" in text
    assert "| pretrain | 20.00 | 25.00 |" in text and "| pretrain | +25.0% |" in text
    assert "accuracy 0.400 at step 0 -> 0.700 at step 2; margin -0.0200 -> 0.0500" in text
    for name in ("loss", "orpo_heldout", "replay_share"):
        assert f"![{name}](plots/{name}.png)" in text and (tmp_path / "plots" / f"{name}.png").is_file()

    html = (tmp_path / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(images) == 3
    from PIL import Image

    for b64 in images:  # real PNGs, wide enough to read the three loss panels unzoomed
        assert Image.open(io.BytesIO(base64.b64decode(b64))).size[0] >= 500
    assert "&lt;b&gt;before&lt;/b&gt;" in html  # generated text is escaped, not markup
    assert "src='plots/" not in html and "href=" not in html  # nothing outside the file

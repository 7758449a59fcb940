"""The quickstart pipeline's stages, built from a ``PipelineConfig``: each one an engine command
line (what a user would type), its inputs and outputs, an estimate and a one-line summary.

    tokenizer -> data -> pretrain -> sft -> orpo -> export -> gguf -> generate -> eval

Paths inside the repository are written relative to its root (the commands run from there),
so the report's commands can be pasted as they are.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from engine.pipeline.config import PipelineConfig, TrainStage
from engine.pipeline.runner import REPO, Stage

# Seconds per step of the tiny preset at TP=2 on 2 CPU processes and the fixed start-up of an
# engine command (interpreter, torch and megatron-core imports, process groups), measured on
# this project's 2-core machine; the plan's estimate, replaced by the measured time after a run.
STARTUP_S = {"train": 30.0, "command": 12.0}
STEP_S = {"pretrain": 0.45, "sft": 0.5, "orpo": 1.0}


def rel(path: Path) -> str:
    """``path`` relative to the repository root when inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def engine_cmd(*args: str) -> List[str]:
    """``python -m engine ARGS`` with this interpreter."""
    return [sys.executable, "-m", "engine", *args]


def available(module: str) -> bool:
    """Whether an engine module providing a command exists in this tree."""
    return importlib.util.find_spec(module) is not None


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_metrics(run_dir: Path, split: str = "train") -> List[Dict[str, Any]]:
    """A run's metric records of ``split``, one per step (the last record of a step wins)."""
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: Dict[int, Dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("split") == split:
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


@dataclass
class Layout:
    """Where every stage reads and writes under the output directory."""

    out: Path

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def configs(self) -> Path:
        return self.out / "configs"

    def run(self, name: str) -> Path:
        """Run directory of a training stage."""
        return self.out / name

    def checkpoint(self, name: str, steps: int) -> Path:
        """The final checkpoint of a training stage of ``steps`` steps."""
        return self.out / name / "checkpoints" / f"iter_{steps:07d}"

    @property
    def hf(self) -> Path:
        return self.out / "hf"

    @property
    def gguf(self) -> Path:
        return self.out / "gguf"

    @property
    def generations(self) -> Path:
        return self.out / "generations"

    @property
    def evaluation(self) -> Path:
        return self.out / "eval"


def train_config(cfg: PipelineConfig, lay: Layout, name: str, objective: str, data: List[str]) -> Dict[str, Any]:
    """The ``engine train`` config of training stage ``name``: ``train`` merged with the stage's
    own keys, then what the pipeline decides (data, tokenizer, steps, directories, lineage)."""
    stage: TrainStage = getattr(cfg, name)
    values = _deep_merge(cfg.train, stage.config)
    forced: Dict[str, Any] = {
        "model": {"preset": cfg.run.preset},
        "data": {"paths": data, "tokenizer": rel(lay.tokenizer)},
        "training": {"steps": cfg.scaled_steps(stage)},
        "objective": {"name": objective},
        "checkpoint": {"dir": rel(lay.run(name))},
    }
    values = _deep_merge(values, forced)
    if values.get("data", {}).get("replay_ratio"):
        values["data"]["replay_paths"] = [rel(lay.data / "pretrain")]
    return values


def _train_cmd(cfg: PipelineConfig, config_path: Path) -> List[str]:
    if cfg.run.nproc == 1:
        return engine_cmd("train", rel(config_path))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.run.nproc}",
        "-m",
        "engine",
        "train",
        rel(config_path),
    ]


def train_summary(run_dir: Path) -> str:
    """First/last training loss, last validation loss, median tok/s (and replay share, ORPO accuracy)."""
    rows = read_metrics(run_dir)
    valid = read_metrics(run_dir, "valid")
    if not rows:
        return "no metrics"
    parts = [f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"]
    if valid:
        parts.append(f"valid loss {valid[-1]['loss']:.3f}")
    share = [k for k in rows[-1] if k.startswith("share/replay")]
    if share:
        parts.append(f"replay share {100 * rows[-1][share[0]]:.1f}%")
    if valid and "rewards/accuracies" in valid[-1]:
        parts.append(f"held-out accuracy {valid[0]['rewards/accuracies']:.2f} -> {valid[-1]['rewards/accuracies']:.2f}")
    tps = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]
    if tps:
        parts.append(f"{statistics.median(tps):,.0f} tok/s")
    return ", ".join(parts)


def build_stages(cfg: PipelineConfig, out: Optional[Path] = None) -> List[Stage]:
    """Every stage of the pipeline, in order (see the module docstring)."""
    lay = Layout(Path(out if out is not None else cfg.run.out))
    corpus = Path(cfg.run.corpus).resolve()
    tok = rel(lay.tokenizer)
    stages: List[Stage] = []

    stages.append(
        Stage(
            "tokenizer",
            f"train a {cfg.tokenizer.vocab_size}-piece SentencePiece tokenizer on the corpus and lint it",
            [
                engine_cmd(
                    "tokenizer",
                    "train",
                    "--input",
                    rel(corpus),
                    "--output-dir",
                    tok,
                    "--vocab-size",
                    str(cfg.tokenizer.vocab_size),
                    *cfg.tokenizer.extra_args,
                )
            ],
            inputs=[corpus],
            outputs=[lay.tokenizer],
            estimate_s=STARTUP_S["command"] / 2,
            summarize=lambda: _tokenizer_summary(lay),
        )
    )

    raw = lay.data / "raw"
    chat_sources: List[Path] = []
    data_cmds = [
        engine_cmd(
            "preprocess",
            "--input",
            rel(corpus),
            "--tokenizer",
            tok,
            "--output-prefix",
            rel(lay.data / "pretrain"),
            "--workers",
            "2",
            "--no-progress",
        )
    ]
    sft_src, pref_src = cfg.chat_data.sft, cfg.chat_data.preference
    if sft_src is None or pref_src is None:
        script = REPO / "examples" / "make_post_training_data.py"
        sample = REPO / "examples" / "data" / "sample.jsonl"
        data_cmds.append(
            [
                sys.executable,
                rel(script),
                "--out-dir",
                rel(raw),
                "--sample",
                rel(sample),
                "--max-chars",
                str(cfg.chat_data.max_chars),
            ]
        )
        chat_sources += [script, sample]
    sft_path = Path(sft_src).resolve() if sft_src else raw / "sft.jsonl"
    pref_path = Path(pref_src).resolve() if pref_src else raw / "preference.jsonl"
    chat_sources += [
        p for p in (Path(sft_src).resolve() if sft_src else None, Path(pref_src).resolve() if pref_src else None) if p
    ]
    seq = str(cfg.train.get("data", {}).get("seq_length", 256))
    template = str(cfg.train.get("data", {}).get("chat_template", "chatml"))
    for kind, src in (("sft", sft_path), ("preference", pref_path)):
        data_cmds.append(
            engine_cmd(
                "preprocess",
                "--kind",
                kind,
                "--input",
                rel(src),
                "--tokenizer",
                tok,
                "--output-prefix",
                rel(lay.data / kind),
                "--seq-length",
                seq,
                "--chat-template",
                template,
                "--no-progress",
            )
        )
    stages.append(
        Stage(
            "data",
            "tokenize the corpus (pretraining) and the SFT and preference data into indexed datasets",
            data_cmds,
            inputs=[corpus, lay.tokenizer, *chat_sources],
            outputs=[lay.data],
            estimate_s=3 * STARTUP_S["command"],
            summarize=lambda: _data_summary(lay),
        )
    )

    previous: Optional[Path] = None
    for name, objective, data, title in (
        ("pretrain", "pretrain", "pretrain", f"pretrain {cfg.run.preset} on the corpus"),
        ("sft", "sft", "sft", "supervised fine-tuning on the chat data (with replay of the corpus)"),
        ("orpo", "orpo", "preference", "ORPO on the preference pairs (held-out accuracy measured before and after)"),
    ):
        values = train_config(cfg, lay, name, objective, [rel(lay.data / data)])
        if previous is not None:
            values.setdefault("checkpoint", {})["init_from"] = rel(previous)
        steps = cfg.scaled_steps(getattr(cfg, name))
        config_path = lay.configs / f"{name}.yaml"
        inputs = [lay.tokenizer, lay.data / f"{data}.bin", lay.data / f"{data}.idx"]
        if values["data"].get("replay_paths"):
            inputs += [lay.data / "pretrain.bin", lay.data / "pretrain.idx"]
        if previous is not None:
            inputs.append(previous)
        layout = values.get("parallel", {})
        abbrev = {"tensor": "TP", "pipeline": "PP", "context": "CP", "expert": "EP", "virtual": "VP"}
        shape = " x ".join(f"{abbrev.get(k, k)}={v}" for k, v in layout.items() if isinstance(v, int) and v > 1)
        stages.append(
            Stage(
                name,
                f"{title}: {steps} steps on {cfg.run.nproc} process(es)" + (f", {shape}" if shape else ""),
                [_train_cmd(cfg, config_path)],
                inputs=inputs,
                outputs=[lay.run(name)],
                settings={"config": values},
                estimate_s=STARTUP_S["train"] + steps * STEP_S[name],
                metrics=lay.run(name) / "logs" / "metrics.jsonl",
                steps=steps,
                prepare=_writer(config_path, values),
                summarize=functools.partial(train_summary, lay.run(name)),
            )
        )
        previous = lay.checkpoint(name, steps)
    final = previous
    assert final is not None

    hf_source = final
    if available("engine.export.hf"):
        stages.append(
            Stage(
                "export",
                "export the ORPO checkpoint to Hugging Face safetensors, with the logit parity check",
                [engine_cmd("export", "hf", rel(final), rel(lay.hf), "--dtype", cfg.export.dtype)],
                inputs=[final],
                outputs=[lay.hf],
                estimate_s=2 * STARTUP_S["command"],
                summarize=lambda: _export_summary(lay),
            )
        )
        hf_source = lay.hf
    if available("engine.export.gguf"):
        gguf_file = gguf_path(cfg, lay)
        stages.append(
            Stage(
                "gguf",
                f"write a {cfg.export.gguf_type} GGUF file (and an Ollama Modelfile) from the export",
                [engine_cmd("export", "gguf", rel(hf_source), rel(gguf_file), "--type", cfg.export.gguf_type)],
                inputs=[hf_source],
                outputs=[lay.gguf],
                estimate_s=STARTUP_S["command"],
                summarize=lambda: _gguf_summary(gguf_file),
            )
        )
    ckpts = {name: lay.checkpoint(name, cfg.scaled_steps(getattr(cfg, name))) for name in ("pretrain", "sft", "orpo")}
    if available("engine.commands.generate"):
        prompts = lay.generations / "prompts.jsonl"
        gen_args = ["--prompts", rel(prompts), "--max-new-tokens", str(cfg.generate.max_new_tokens), "--quiet"]
        if cfg.generate.greedy:
            gen_args.append("--greedy")
        stages.append(
            Stage(
                "generate",
                f"answer {len(cfg.generate.prompts)} prompt(s) with the chat template before (SFT) and after ORPO",
                [
                    engine_cmd(
                        "generate", rel(ckpts[name]), *gen_args, "--output", rel(lay.generations / f"{name}.jsonl")
                    )
                    for name in ("sft", "orpo")
                ],
                inputs=[ckpts["sft"], ckpts["orpo"]],
                outputs=[lay.generations / "sft.jsonl", lay.generations / "orpo.jsonl"],
                settings={"prompts": cfg.generate.prompts},
                estimate_s=2 * STARTUP_S["command"] + 0.2 * len(cfg.generate.prompts) * cfg.generate.max_new_tokens,
                prepare=_prompts_writer(prompts, cfg.generate.prompts),
                summarize=lambda: _generate_summary(lay),
            )
        )
    if available("engine.commands.eval"):
        eval_prompts = lay.evaluation / "prompts.jsonl"
        all_prompts = list(dict.fromkeys([*cfg.generate.prompts, *cfg.eval.prompts]))
        datasets = [rel(lay.data / "pretrain"), rel(lay.data / "sft")]
        # The generation metrics need the inference package (the generate command's).
        gen_metrics = ["--prompts", rel(eval_prompts), "--max-new-tokens", str(cfg.eval.max_new_tokens)]
        if not available("engine.inference"):
            gen_metrics = []
        stages.append(
            Stage(
                "eval",
                "perplexity of every stage's checkpoint on the held-out corpus and chat data (forgetting), "
                "repetition and EOS rate of greedy answers",
                [
                    engine_cmd(
                        "eval",
                        rel(ckpts[name]),
                        "--data",
                        *datasets,
                        "--split",
                        "valid",
                        *gen_metrics,
                        "--out",
                        rel(lay.evaluation / name),
                    )
                    for name in ("pretrain", "sft", "orpo")
                ],
                inputs=[*ckpts.values(), lay.data / "pretrain.bin", lay.data / "sft.bin"],
                outputs=[lay.evaluation / name for name in ("pretrain", "sft", "orpo")],
                settings={"prompts": all_prompts},
                estimate_s=3 * (STARTUP_S["command"] + 0.05 * len(all_prompts) * cfg.eval.max_new_tokens),
                prepare=_prompts_writer(eval_prompts, all_prompts),
                summarize=lambda: _eval_summary(lay),
            )
        )
    return stages


def gguf_path(cfg: PipelineConfig, lay: Layout) -> Path:
    """The GGUF file the pipeline writes."""
    return lay.gguf / f"model-{cfg.export.gguf_type}.gguf"


def _prompts_writer(path: Path, prompts: List[str]):
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8"
        )

    return write


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """Records of a JSONL file ([] when it is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_results(lay: Layout) -> Dict[str, Dict[str, Any]]:
    """Stage name -> the eval command's JSON result of its checkpoint."""
    out = {}
    for name in ("pretrain", "sft", "orpo"):
        files = sorted((lay.evaluation / name).glob("eval_*.json"))
        if files:
            out[name] = json.loads(files[-1].read_text())
    return out


def _generate_summary(lay: Layout) -> str:
    parts = []
    for name in ("sft", "orpo"):
        recs = read_jsonl(lay.generations / f"{name}.jsonl")
        ends = sum(1 for r in recs if r.get("finished_by") not in (None, "length", "max_new_tokens"))
        parts.append(f"{name}: {len(recs)} answers, {ends} ended by the model")
    return ", ".join(parts)


def _eval_summary(lay: Layout) -> str:
    parts = []
    for name, res in eval_results(lay).items():
        ppl = "/".join(f"{p['perplexity']:.1f}" for p in res.get("perplexity", []))
        parts.append(f"{name} ppl {ppl}")
    return ", ".join(parts) + " (corpus/chat held-out)"


def _writer(path: Path, values: Dict[str, Any]):
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# Written by `python -m engine pipeline`: this stage's resolved pipeline keys.\n"
        text += yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)

    return write


def _tokenizer_summary(lay: Layout) -> str:
    meta = json.loads((lay.tokenizer / "tokenizer_meta.json").read_text())
    return f"{meta.get('trained_vocab_size')} pieces, vocab {meta.get('vocab_size')}, lint OK"


def _data_summary(lay: Layout) -> str:
    parts = []
    for kind in ("pretrain", "sft", "preference"):
        side = json.loads((lay.data / f"{kind}.json").read_text())
        docs = side.get("num_documents", side.get("documents", "?"))
        toks = side.get("num_tokens", side.get("tokens", "?"))
        parts.append(f"{kind} {docs} docs / {toks} tokens")
    return ", ".join(parts)


def _export_summary(lay: Layout) -> str:
    meta = json.loads((lay.hf / "engine_export.json").read_text())
    parity = meta.get("parity") or {}
    return (
        f"{meta.get('parameters', 0):,} parameters at {meta.get('dtype')}, "
        f"parity max |logit diff| {parity.get('max_abs_logit_diff', float('nan')):.2e} (bound {parity.get('tolerance')})"
    )


def _gguf_summary(path: Path) -> str:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return f"{path.name}: {len(reader.tensors)} tensors, {path.stat().st_size / 2**20:.1f} MiB"

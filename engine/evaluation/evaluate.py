"""Evaluate checkpoints: one, two compared (forgetting), or every checkpoint of a run.

A checkpoint's evaluation is a JSON-ready dict::

    {"checkpoint": path, "iteration": N, "config_hash": h,
     "perplexity": [PerplexityResult.to_dict(), ...],          # one per dataset
     "generation": generation_stats(...) | None,               # with --prompts
     "samples": [{"prompt", "text", "finished_by", "tokens"}]} # the generations themselves

The model is loaded on one process (``model_io.load_model``: any saved layout, resharded).
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from engine.config import ConfigError
from engine.evaluation.generation_metrics import Generation, generated_tokens, generation_stats
from engine.evaluation.perplexity import SPLITS, gpt_logits_fn, perplexity


@dataclass
class EvalOptions:
    """What to evaluate a checkpoint on."""

    datasets: Optional[List[str]] = None
    """Indexed dataset prefixes; None: the checkpoint's own ``data.paths``."""
    split: Optional[str] = None
    """``valid``, ``test`` or ``all``; None: the checkpoint's validation split (its test
    split when ``data.split`` gives validation nothing)."""
    split_spec: Optional[str] = None
    """The ``data.split`` string the held-out part is cut with; None: the checkpoint's."""
    seq_length: Optional[int] = None
    """Window length; None: the checkpoint's ``data.seq_length``."""
    max_tokens: Optional[int] = None
    """Score at most this many tokens per dataset (the first windows); None: all."""
    batch_size: int = 8
    """Windows per forward pass."""
    prompts: Optional[str] = None
    """A prompts file (one per line, or JSONL with ``prompt``): greedy generations + metrics."""
    max_new_tokens: int = 128
    """Generation length limit."""
    chat_template: bool = True
    """Wrap each prompt as a user turn of the checkpoint's chat template."""


def default_split(split_spec: str) -> str:
    """``valid`` when ``split_spec`` gives the validation split a share, else ``test``."""
    from engine.data.gpt_data import _split_fractions

    fractions = _split_fractions(split_spec)
    if fractions[1] > 0:
        return "valid"
    if fractions[2] > 0:
        return "test"
    raise ConfigError(f"data.split {split_spec!r} holds out nothing (no valid or test share); pass --split all")


def resolve_options(cfg, opts: EvalOptions) -> EvalOptions:
    """``opts`` with every None filled from the checkpoint config ``cfg``."""
    datasets = opts.datasets or list(cfg.data.paths)
    if not datasets:
        raise ConfigError("the checkpoint's config names no data.paths (mock data); pass --data PREFIX")
    split_spec = opts.split_spec or cfg.data.split
    split = opts.split or default_split(split_spec)
    if split not in SPLITS:
        raise ConfigError(f"--split {split} must be one of {', '.join(SPLITS)}")
    return dataclasses.replace(
        opts, datasets=datasets, split=split, split_spec=split_spec, seq_length=opts.seq_length or cfg.data.seq_length
    )


def read_prompts(path: str) -> List[str]:
    """Prompts of a file: JSONL records with ``prompt`` (or ``text``), or one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file {path} does not exist")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix in (".jsonl", ".json"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not JSON ({exc.msg})") from None
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"{path}:{n}: a JSONL prompt needs a string 'prompt' field")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompt")
    return prompts


def run_generations(generator, prompts: List[str], opts: EvalOptions) -> Dict[str, Any]:
    """Greedy generations of ``prompts`` by ``generator`` (an ``engine.inference.Generator``:
    the checkpoint with its tokenizer, chat template and stop tokens) and their metrics."""
    from engine.inference import GenerationOptions

    results = generator.generate(
        prompts, GenerationOptions(greedy=True, max_new_tokens=opts.max_new_tokens), chat=opts.chat_template
    )
    stop_ids = [generator.stops.eos, *generator.stops.end_of_turn]
    gens = [Generation(generated_tokens(r.tokens, r.finished_by, stop_ids), r.finished_by, r.text) for r in results]
    return {
        "stats": generation_stats(gens),
        "samples": [
            {"prompt": p, "text": g.text, "finished_by": g.finished_by, "tokens": len(g.tokens)}
            for p, g in zip(prompts, gens)
        ],
    }


def _load(ckpt: Path, with_generation: bool):
    """(LoadedModel, Generator or None): the model once, with its tokenizer, chat template
    and stop tokens when generations are asked for."""
    import torch

    from engine.model_io import load_model

    if not with_generation:
        return load_model(ckpt, torch.float32), None
    try:
        from engine.inference import load_generator
    except ImportError as exc:  # the generation package lands separately
        raise ConfigError(f"--prompts needs engine.inference, which is not available here ({exc})") from None
    generator = load_generator(ckpt, dtype=torch.float32)
    return generator.loaded, generator


def evaluate_checkpoint(path: str | Path, opts: EvalOptions) -> Dict[str, Any]:
    """Perplexity of the checkpoint at ``path`` on each dataset (and generation metrics with
    ``opts.prompts``); see the module docstring for the result."""
    from engine.model_io import checkpoint_config, config_hash, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    opts = resolve_options(checkpoint_config(ckpt), opts)
    prompts = read_prompts(opts.prompts) if opts.prompts else []  # a bad file fails before loading
    loaded, generator = _load(ckpt, bool(prompts))
    try:
        logits = gpt_logits_fn(loaded.model)
        assert opts.datasets is not None and opts.split is not None and opts.split_spec is not None
        assert opts.seq_length is not None
        ppl = [
            perplexity(
                logits,
                prefix,
                loaded.cfg.model.vocab_size,
                opts.split_spec,
                opts.split,
                opts.seq_length,
                batch_size=opts.batch_size,
                max_tokens=opts.max_tokens,
            ).to_dict()
            for prefix in opts.datasets
        ]
        gen = run_generations(generator, prompts, opts) if generator is not None else None
        return {
            "checkpoint": str(ckpt),
            "iteration": loaded.iteration,
            "config_hash": config_hash(loaded.cfg),
            "perplexity": ppl,
            "generation": gen["stats"] if gen else None,
            "samples": gen["samples"] if gen else [],
        }
    finally:
        # Sweeps and comparisons load one model after the other: free this one first.
        del loaded, generator
        gc.collect()


def compare_checkpoints(a: str, b: str, opts: EvalOptions) -> Dict[str, Any]:
    """Both checkpoints on the same datasets and windows (A's defaults) and the per-dataset
    change ``(ppl_B - ppl_A) / ppl_A`` (the "forgetting" of B relative to A)."""
    from engine.model_io import checkpoint_config, resolve_checkpoint

    opts = resolve_options(checkpoint_config(resolve_checkpoint(a)), opts)
    res_a = evaluate_checkpoint(a, opts)
    res_b = evaluate_checkpoint(b, opts)
    return {"a": res_a, "b": res_b, "change": perplexity_change(res_a, res_b)}


def perplexity_change(res_a: Dict[str, Any], res_b: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per dataset: both perplexities and the relative change from A to B."""
    rows = []
    for pa, pb in zip(res_a["perplexity"], res_b["perplexity"]):
        rows.append(
            {
                "dataset": pa["dataset"],
                "name": pa["name"],
                "ppl_a": pa["perplexity"],
                "ppl_b": pb["perplexity"],
                "change": (pb["perplexity"] - pa["perplexity"]) / pa["perplexity"],
            }
        )
    return rows


def sweep_run(run_dir: str | Path, opts: EvalOptions) -> Dict[str, Any]:
    """Every complete checkpoint of ``run_dir``, oldest first, on the same datasets and windows
    (the newest checkpoint's defaults)."""
    from engine import checkpoint as ckpt_lib
    from engine.model_io import checkpoint_config

    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    ckpts: Sequence[Path] = ckpt_lib.list_checkpoints(str(run_dir))
    if not ckpts:
        raise ConfigError(f"{run_dir}: no complete checkpoint under checkpoints/ to sweep")
    opts = resolve_options(checkpoint_config(ckpts[-1]), opts)
    return {"run_dir": str(run_dir), "checkpoints": [evaluate_checkpoint(c, opts) for c in ckpts]}

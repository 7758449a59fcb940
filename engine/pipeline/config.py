"""The pipeline's config tree: which corpus, which model, how many steps per stage, and the
engine config every training stage starts from.

Loaded with the run config's own key and type checks (``engine.config.apply_mapping``), so a
misspelt key names the closest valid ones. Each training stage's ``config`` is a nested mapping
of engine config keys (``model``, ``data``, ``training``, ...): the pipeline merges it over
``train`` and writes the result as that stage's ``engine train`` config, which the engine
validates when the stage starts (and ``python -m engine config`` can resolve it on its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional

import yaml

from engine.config import ConfigError, Range, apply_mapping


@dataclass
class RunSettings:
    """What the pipeline runs on and where it writes (the command-line options override these)."""

    corpus: str = "examples/data/sample.jsonl"
    """Pretraining corpus: a JSONL file with a ``text`` field per document (tokenizer and pretraining)."""
    out: str = "examples/out"
    """Output directory: one sub-directory per stage, ``logs/``, ``configs/`` and the report."""
    preset: str = "tiny-llama"
    """Model preset of every training stage (``python -m engine info`` lists them)."""
    steps_scale: Annotated[float, Range(gt=0)] = 1.0
    """Multiplies every stage's step count (at least 1 step each): 0.05 for a smoke run."""
    nproc: Annotated[int, Range(ge=1)] = 2
    """Processes of each training stage (torchrun; 1 runs ``python -m engine train`` directly)."""


@dataclass
class TokenizerStage:
    """Tokenizer training (``engine tokenizer train``, which lints the result and fails on a bad one)."""

    vocab_size: Annotated[int, Range(ge=16)] = 4000
    """Pieces to train (padded to a multiple of 128 in the model)."""
    extra_args: List[str] = field(default_factory=list)
    """More ``engine tokenizer train`` options, e.g. ``[--model-type, bpe]``."""


@dataclass
class ChatDataStage:
    """SFT and preference data (``engine preprocess --kind sft|preference``)."""

    sft: Optional[str] = None
    """SFT JSONL (Alpaca or ``messages`` records); None builds it from the bundled sample's
    constitution articles (``examples/make_post_training_data.py``)."""
    preference: Optional[str] = None
    """Preference JSONL (``{prompt, chosen, rejected}``); None builds it as ``sft`` does."""
    max_chars: Annotated[int, Range(ge=16)] = 160
    """Built data only: each article's text is cut to this many characters."""


@dataclass
class TrainStage:
    """One training stage (``engine train``): its step count and its engine config keys."""

    steps: Annotated[int, Range(ge=1)] = 100
    """Optimizer steps at ``steps_scale`` 1."""
    config: Dict[str, Any] = field(default_factory=dict)
    """Engine config keys of this stage, merged over ``train`` (e.g. ``{optimizer: {lr: 3e-3}}``)."""


@dataclass
class ExportStage:
    """Hugging Face export with the logit parity check (``engine export hf``) and GGUF (``engine export gguf``)."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights' dtype in the safetensors files."""
    gguf_type: Literal["f16", "q8_0"] = "f16"
    """Tensor type of the GGUF file."""


@dataclass
class GenerateStage:
    """Sample generations with the chat template (``engine generate``), before and after ORPO."""

    prompts: List[str] = field(default_factory=lambda: ["대한민국헌법 제1조의 내용은 무엇입니까?"])
    """User messages; each is answered by the SFT and by the ORPO model."""
    max_new_tokens: Annotated[int, Range(ge=1)] = 48
    """Tokens generated per prompt at most."""
    greedy: bool = True
    """Greedy decoding (reproducible); False samples with the generate command's defaults."""


@dataclass
class EvalStage:
    """Evaluation of every stage's checkpoint (``engine eval``): perplexity per dataset, the
    forgetting between stages, repetition and EOS rate of generations."""

    prompts: List[str] = field(default_factory=list)
    """Prompts answered (greedy) for the repetition and EOS figures, besides ``generate.prompts``."""
    max_new_tokens: Annotated[int, Range(ge=1)] = 48
    """Tokens generated per prompt for the repetition and EOS figures."""


@dataclass
class PipelineConfig:
    """The whole pipeline: corpus -> tokenizer -> data -> pretrain -> SFT -> ORPO -> export -> GGUF -> generate -> eval."""

    run: RunSettings = field(default_factory=RunSettings)
    """Inputs, output directory, preset, step scale, processes."""
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    """Tokenizer training."""
    chat_data: ChatDataStage = field(default_factory=ChatDataStage)
    """SFT and preference data."""
    train: Dict[str, Any] = field(default_factory=dict)
    """Engine config keys shared by every training stage (model, data, training, parallel, ...)."""
    pretrain: TrainStage = field(default_factory=lambda: TrainStage(steps=200))
    """Pretraining on the corpus."""
    sft: TrainStage = field(default_factory=TrainStage)
    """SFT from the pretrained checkpoint (with replay when ``data.replay_ratio`` is set)."""
    orpo: TrainStage = field(default_factory=TrainStage)
    """ORPO from the SFT checkpoint."""
    export: ExportStage = field(default_factory=ExportStage)
    """Hugging Face and GGUF export."""
    generate: GenerateStage = field(default_factory=GenerateStage)
    """Sample generations."""
    eval: EvalStage = field(default_factory=EvalStage)
    """Evaluation."""

    def scaled_steps(self, stage: TrainStage) -> int:
        """``stage.steps`` times ``run.steps_scale``, at least 1."""
        return max(1, int(round(stage.steps * self.run.steps_scale)))


def load_pipeline_config(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read a pipeline YAML; keyword ``overrides`` (None: not given) replace ``run`` settings."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline config '{p}' does not exist")
    values = yaml.safe_load(p.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"'{p}' must hold a mapping at the top level")
    cfg = PipelineConfig()
    apply_mapping(cfg, values)
    apply_mapping(cfg.run, {k: v for k, v in overrides.items() if v is not None}, "run.")
    if not isinstance(cfg.train, dict):
        raise ConfigError("'train' must be a mapping of engine config keys")
    for name in ("pretrain", "sft", "orpo"):
        if not isinstance(getattr(cfg, name).config, dict):
            raise ConfigError(f"'{name}.config' must be a mapping of engine config keys")
    return cfg

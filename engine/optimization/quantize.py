"""Post-training quantization (PTQ) through nvidia-modelopt: calibrate, measure, save, export.

``quantize_checkpoint`` is ``python -m engine quantize``: load an engine checkpoint
(``engine.model_io.load_model``), insert modelopt's fake quantizers with the format's own
modelopt config (``mtq.quantize``) and calibrate them with forward passes over windows of
an indexed dataset, measure held-out perplexity before and after, and write

- ``OUT/checkpoints/iter_N``: a normal engine checkpoint whose config records the format
  (``precision.qat``) and which carries modelopt's state (``engine/optimization/
  modelopt_state.py``), so every loader restores the quantizers, and training from it
  (with ``precision.qat`` set) is quantization-aware training;
- ``OUT/hf``: a Hugging Face checkpoint in modelopt's unified format (real FP8 weights with
  their scales, ``hf_quant_config.json``) where modelopt 0.42's megatron-core exporter
  (``export_mcore_gpt_to_hf``) supports the format and the architecture: FP8 (and NVFP4 on
  a GPU) for LLaMA-family models;
- ``OUT/quantize_report.json``: the perplexities and what was written.

Formats and modelopt configs (``FORMATS``): ``fp8`` (E4M3 weights and activations,
per-tensor scales), ``int8`` (per-channel weights, per-tensor activations), ``int8_sq``
(the same after SmoothQuant), ``int4_awq`` (4-bit weights in blocks of 128, activation-aware
scaling), ``w4a8_awq`` (4-bit AWQ weights, FP8 activations), ``nvfp4`` (needs CUDA kernels:
refused on CPU before anything runs, since a failed ``mtq.quantize`` leaves the process
unusable). On CPU the quantizers are emulated ("fake quant"): the numbers are the quantized
model's, the speed is not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, cast

import numpy as np
import torch

from engine.config import ConfigError, QuantFormat
from engine.optimization import modelopt_state

if TYPE_CHECKING:
    from engine.evaluation.perplexity import Window

log = logging.getLogger(__name__)

FORMATS: Dict[str, str] = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8": "INT8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
}
"""Format name (``--format``, ``precision.qat``) -> the modelopt config it uses (``mtq.<name>``)."""

CUDA_FORMATS = ("nvfp4",)
"""Formats whose quantizers only run with modelopt's CUDA kernels."""

HF_EXPORT_FORMATS = ("fp8", "nvfp4")
"""Formats modelopt 0.42's megatron-core exporter writes as a quantized HF checkpoint (for
the others it records no quantization config, so the files would be unusable)."""

REPORT = "quantize_report.json"


def check_format(fmt: str, cuda: bool) -> None:
    """ConfigError (one line) for an unknown format, or a CUDA-only one without a GPU."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt in CUDA_FORMATS and not cuda:
        cpu = ", ".join(f for f in FORMATS if f not in CUDA_FORMATS)
        raise ConfigError(f"--format {fmt} needs a CUDA GPU (modelopt's {fmt} kernels); on CPU use one of {cpu}")


def modelopt_config(fmt: str) -> Dict[str, Any]:
    """A fresh copy of modelopt's own quantization config for ``fmt`` (modelopt's defaults
    already leave the output layer, routers and norms unquantized)."""
    import modelopt.torch.quantization as mtq

    return copy.deepcopy(getattr(mtq, FORMATS[fmt]))


# ----------------------------------------------------------------------------- data


def calibration_windows(prefix: str, count: int, seq_length: int) -> List["Window"]:
    """The first ``count`` windows of the indexed dataset ``prefix`` (from its start, whatever
    its splits), cut as ``engine.evaluation.perplexity`` cuts them (``seq_length + 1`` tokens,
    stride ``seq_length``; chat data one conversation at a time). Reads only what it needs.
    ConfigError (one line) when the files are missing or hold fewer windows."""
    from engine.evaluation.perplexity import dataset_windows

    _, windows = dataset_windows(prefix, "100,0,0", "all", seq_length, max_tokens=count * seq_length)
    if len(windows) < count:
        raise ConfigError(
            f"{prefix} holds {len(windows)} windows of {seq_length} tokens, fewer than the {count} asked for"
        )
    return windows[:count]


def held_out_windows(prefix: str, split_spec: str, split: str, count: int, seq_length: int) -> List["Window"]:
    """Up to ``count`` windows of ``prefix``'s held-out ``split`` (``valid``, ``test``, or
    ``all``), cut by ``split_spec`` as training cut it (``engine.evaluation.perplexity``)."""
    from engine.evaluation.perplexity import dataset_windows

    _, windows = dataset_windows(prefix, split_spec, split, seq_length, max_tokens=count * seq_length)
    return windows[:count]


def forward_windows(model: torch.nn.Module, windows: List["Window"], micro_batch: int, desc: str) -> None:
    """Forward passes over every window (no gradient), ``micro_batch`` windows of one length
    at a time: the calibration loop modelopt's quantizers observe."""
    from tqdm import tqdm

    from engine.evaluation.perplexity import gpt_logits_fn

    logits = gpt_logits_fn(model)
    by_length: Dict[int, List[np.ndarray]] = {}
    for w in windows:
        by_length.setdefault(len(w.tokens), []).append(w.tokens)
    with torch.no_grad(), tqdm(total=len(windows), desc=desc, unit="win", mininterval=1.0, disable=None) as bar:
        for group in by_length.values():
            for i in range(0, len(group), micro_batch):
                batch = torch.from_numpy(np.stack(group[i : i + micro_batch]))
                logits(batch[:, :-1])
                bar.update(len(batch))


def mean_nll(model: torch.nn.Module, windows: List["Window"], vocab_size: int, micro_batch: int, desc: str) -> float:
    """Token-weighted mean next-token NLL (nats) of ``model`` over ``windows``, as
    ``engine.evaluation.perplexity`` scores it (fp32, the tokenizer's ``vocab_size`` columns);
    ``exp`` of it is the perplexity."""
    from engine.evaluation.perplexity import gpt_logits_fn, score_windows

    model.eval()
    nll_sum, tokens = score_windows(gpt_logits_fn(model), windows, vocab_size, micro_batch, desc=desc)
    return nll_sum / tokens


def quantize_model(
    model: torch.nn.Module, fmt: str, forward_loop: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """Insert and calibrate ``fmt``'s fake quantizers (``mtq.quantize`` with modelopt's config);
    ``forward_loop(model)`` runs the calibration forward passes (AWQ runs it several times)."""
    modelopt_state.require_modelopt()
    check_format(fmt, torch.cuda.is_available())
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, modelopt_config(fmt), forward_loop)


# --------------------------------------------------------------------------- export


def hf_export_blocker(cfg, fmt: str) -> Optional[str]:
    """Why ``fmt`` on ``cfg``'s model cannot be exported to Hugging Face by modelopt 0.42's
    megatron-core exporter, or None when it can."""
    from models.hf_convert import ConversionError, hf_family

    if fmt not in HF_EXPORT_FORMATS:
        return f"modelopt's megatron-core exporter writes {' and '.join(HF_EXPORT_FORMATS)} checkpoints only, not {fmt}"
    try:
        family = hf_family(cfg.model)
    except ConversionError as exc:
        return str(exc)
    if family != "llama":
        return f"modelopt's megatron-core exporter maps LLaMA-family models only, not {family}"
    if not cfg.data.tokenizer:
        return "the checkpoint names no tokenizer (data.tokenizer), which modelopt's exporter needs"
    return None


def export_hf(model: torch.nn.Module, cfg, out_dir: Path) -> None:
    """Write the quantized ``model`` (``cfg`` its checkpoint's config) as a Hugging Face
    checkpoint in modelopt's unified format into ``out_dir``, through a temporary sibling
    renamed when complete. modelopt's ``export_mcore_gpt_to_hf`` converts the weights (FP8:
    E4M3 weights with ``weight_scale`` and ``input_scale``) and starts from a base directory
    holding the architecture's ``config.json`` (``models.hf_convert.hf_config``); the
    tokenizer files are the ones ``python -m engine export hf`` writes (``engine.export.hf``)."""
    from modelopt.torch.export import export_mcore_gpt_to_hf

    from engine.data.chat_template import get_chat_template
    from engine.data.tokenizer import load_checkpoint_tokenizer
    from engine.data.tokenizer_hf import write_tokenizer
    from models.hf_convert import hf_config, hf_model_class

    tok = load_checkpoint_tokenizer(cfg)
    if tok is None:
        raise ConfigError("the checkpoint names no tokenizer (data.tokenizer), which modelopt's exporter needs")
    template = get_chat_template(cfg.data.chat_template).to_jinja()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory() as base:
            ids = {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}
            token_ids: Dict[str, Any] = {k: (v if v >= 0 else None) for k, v in ids.items()}
            config = hf_config(cfg.model, **token_ids)
            config.architectures = [hf_model_class(cfg.model).__name__]
            config.save_pretrained(base)
            # modelopt re-saves the base's tokenizer with AutoTokenizer; it must find one.
            write_tokenizer(tok, template, Path(base), cfg.model.max_seq_length)
            export_mcore_gpt_to_hf(model, base, dtype=next(model.parameters()).dtype, export_dir=str(tmp))
        write_tokenizer(tok, template, tmp, cfg.model.max_seq_length)  # the engine's files, not the re-save
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_quantized_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint written by ``python -m engine quantize`` (any saved layout) to
    Hugging Face through modelopt's exporter; returns ``out_dir``. ConfigError (one line)
    for an unquantized checkpoint or a format/architecture modelopt cannot export, and when
    ``out_dir`` exists."""
    from engine import model_io

    ckpt = model_io.resolve_checkpoint(checkpoint)
    cfg = model_io.checkpoint_config(ckpt)
    if not cfg.precision.qat:
        raise ConfigError(f"{ckpt} is not quantized (no precision.qat in its config)")
    blocker = hf_export_blocker(cfg, cfg.precision.qat)
    if blocker is not None:
        raise ConfigError(f"{ckpt}: {blocker}")
    if Path(out_dir).exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output directory")
    loaded = model_io.load_model(ckpt)
    export_hf(loaded.model, loaded.cfg, Path(out_dir))
    return Path(out_dir)


# ---------------------------------------------------------------------------- command


@dataclass
class QuantizeResult:
    """What ``quantize_checkpoint`` measured and wrote (also ``OUT/quantize_report.json``)."""

    format: str
    source: str
    checkpoint: str
    calib_windows: int
    eval_data: str
    eval_split: str
    eval_windows: int
    seq_length: int
    nll_before: float
    nll_after: float
    hf_dir: Optional[str] = None
    hf_skipped: Optional[str] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def ppl_before(self) -> float:
        """Held-out perplexity of the unquantized model."""
        return float(np.exp(self.nll_before))

    @property
    def ppl_after(self) -> float:
        """Held-out perplexity of the quantized model."""
        return float(np.exp(self.nll_after))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON report: every field plus both perplexities and their relative change."""
        return {
            **dataclasses.asdict(self),
            "ppl_before": self.ppl_before,
            "ppl_after": self.ppl_after,
            "ppl_change": self.ppl_after / self.ppl_before - 1.0,
        }


def quantize_checkpoint(
    checkpoint: str,
    out: str,
    fmt: str,
    calib_data: str,
    calib_samples: int,
    eval_data: Optional[str] = None,
    eval_split: str = "valid",
    eval_samples: int = 32,
    seq_length: Optional[int] = None,
    micro_batch: int = 4,
    dtype: Optional[torch.dtype] = None,
    export: bool = True,
) -> QuantizeResult:
    """PTQ of ``checkpoint`` (a checkpoint or run directory) into the run directory ``out``.

    Calibrates on the first ``calib_samples`` windows of ``calib_data``; perplexity is
    measured on the first ``eval_samples`` windows of the ``eval_split`` of ``eval_data``
    (default ``calib_data``), cut by the checkpoint's ``data.split`` as training cut it: with
    the training data, windows the model never trained on. Every input is checked before
    the model is loaded. One process, the whole model."""
    import time

    from engine import checkpoint as ckpt_lib
    from engine import model_io

    check_format(fmt, torch.cuda.is_available())
    modelopt_state.require_modelopt()
    if calib_samples < 1 or eval_samples < 1 or micro_batch < 1:
        raise ConfigError("--calib-samples, --eval-samples and --micro-batch must be >= 1")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not empty; choose a new output directory")
    source = model_io.resolve_checkpoint(checkpoint)
    src_cfg = model_io.checkpoint_config(source)
    if src_cfg.precision.qat:
        raise ConfigError(f"{source} is already quantized ({src_cfg.precision.qat})")
    seq = seq_length or src_cfg.data.seq_length
    if seq > src_cfg.model.max_seq_length:
        raise ConfigError(f"--seq-length {seq} exceeds the model's max_seq_length ({src_cfg.model.max_seq_length})")
    calib = calibration_windows(calib_data, calib_samples, seq)
    held_out = held_out_windows(eval_data or calib_data, src_cfg.data.split, eval_split, eval_samples, seq)

    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    loaded = model_io.load_model(source, dtype or torch.float32)
    model, cfg = loaded.model, loaded.cfg
    vocab = cfg.model.vocab_size
    nll_before = mean_nll(model, held_out, vocab, micro_batch, "perplexity (unquantized)")
    seconds["load_and_eval"] = time.perf_counter() - t

    t = time.perf_counter()
    model = quantize_model(model, fmt, lambda m: forward_windows(m, calib, micro_batch, f"calibrate {fmt}"))
    seconds["calibrate"] = time.perf_counter() - t
    nll_after = mean_nll(model, held_out, vocab, micro_batch, f"perplexity ({fmt})")

    t = time.perf_counter()
    qcfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, qat=cast(QuantFormat, fmt)))
    saved = model_io.save_model_checkpoint(
        out_dir, qcfg, [model], iteration=loaded.iteration, lineage=ckpt_lib.read_lineage(source)
    )
    seconds["save"] = time.perf_counter() - t
    result = QuantizeResult(
        format=fmt,
        source=str(source),
        checkpoint=str(saved),
        calib_windows=calib_samples,
        eval_data=eval_data or calib_data,
        eval_split=eval_split,
        eval_windows=len(held_out),
        seq_length=seq,
        nll_before=nll_before,
        nll_after=nll_after,
        seconds=seconds,
    )
    blocker = hf_export_blocker(cfg, fmt) if export else "not asked for (--no-hf)"
    if blocker is None:
        t = time.perf_counter()
        export_hf(model, cfg, out_dir / "hf")
        seconds["hf_export"] = time.perf_counter() - t
        result.hf_dir = str(out_dir / "hf")
    else:
        result.hf_skipped = blocker
    report = out_dir / REPORT
    tmp = report.with_name(REPORT + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    tmp.rename(report)
    return result


def describe(result: QuantizeResult) -> List[str]:
    """The lines the command prints."""
    change = result.ppl_after / result.ppl_before - 1.0
    lines = [
        f"{result.format}: held-out perplexity {result.ppl_before:.4f} -> {result.ppl_after:.4f} "
        f"({change:+.2%}) over {result.eval_windows} windows of {result.seq_length} tokens "
        f"({Path(result.eval_data).name}, {result.eval_split} split); "
        f"calibrated on {result.calib_windows} windows",
        f"checkpoint: {result.checkpoint}",
    ]
    lines.append(
        f"hugging face: {result.hf_dir}" if result.hf_dir else f"hugging face: not written ({result.hf_skipped})"
    )
    return lines

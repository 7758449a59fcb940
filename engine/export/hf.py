"""`python -m engine export hf CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face model directory.

What is written (through transformers' ``save_pretrained``, so any transformers-based tool
reads it): safetensors shards with their index, ``config.json`` (readable by transformers
4.x and 5.x: ``rope_theta`` next to ``rope_parameters``), ``generation_config.json`` (BOS,
EOS and end-of-turn ids, the model cards' sampling defaults), the tokenizer
(``tokenizer.json``, ``tokenizer.model``, ``tokenizer_config.json`` with the data's chat
template as Jinja, ``special_tokens_map.json``) and ``engine_export.json`` (where the
weights came from and the parity figure).

Parity: a fixed prompt (the start of a rendered chat) goes through the engine model and
through the exported directory loaded back with transformers, both on CPU in fp32; the
largest absolute logit difference is printed and recorded, and above ``PARITY_TOL`` the
export fails. With ``--dtype bf16`` the engine's weights are rounded to bf16 before its
forward pass, so the figure measures the mapping, not the rounding.

Nothing half-written is left at OUT_DIR: everything goes to ``OUT_DIR.tmp-<pid>``, which
is renamed to OUT_DIR only after the parity check passed (and removed on any failure).

Memory (one process, CPU): the model once in fp32 while the engine computes its logits,
the exported copy in the export dtype while it is saved shard by shard, then the exported
copy once in fp32 for its logits; never two fp32 copies at once. A 3B model in bf16:
about 12 GiB at the peak (see ``examples/bench_export.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from engine.config import ConfigError

if TYPE_CHECKING:  # torch and transformers are imported by the functions that need them
    import torch

    from engine.config import Config
    from engine.data.tokenizer import Tokenizer

PARITY_TOL = 1e-4
"""Largest accepted max |logit difference| between the engine and the exported model."""
PARITY_TOKENS = 32
"""Length of the parity prompt (the first tokens of ``PARITY_CONVERSATION`` rendered)."""
PARITY_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of Korea? Answer in one sentence."},
    {"role": "assistant", "content": "The capital of the Republic of Korea is Seoul."},
    {"role": "user", "content": "And how many people live there?"},
]
# The model cards' sampling defaults (seeds 000-003).
SAMPLING_DEFAULTS: Dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.2,
}
DTYPES = ("bf16", "fp32")
EXPORT_INFO = "engine_export.json"


class ExportError(ConfigError):
    """A checkpoint that cannot be exported as asked (one line; the CLI exits 2)."""


class ParityError(ExportError):
    """The exported model's logits differ from the engine's by more than ``PARITY_TOL``."""


def register(formats) -> None:
    """Add ``export hf``."""
    p = formats.add_parser(
        "hf",
        help="Hugging Face safetensors + config + tokenizer, logit parity checked",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="output directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the written weights (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument(
        "--allow-sliding-window-mismatch",
        action="store_true",
        help="export a model whose per-layer sliding window transformers cannot express with full "
        "causal attention instead (identical up to the window length, different beyond)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from engine import model_io

    ckpt = model_io.resolve_checkpoint(args.checkpoint)
    qat = model_io.checkpoint_config(ckpt).precision.qat
    if qat:  # a `python -m engine quantize` checkpoint: modelopt's exporter writes its format
        from engine.optimization.quantize import export_quantized_checkpoint

        export_quantized_checkpoint(ckpt, args.out_dir)
        print(
            f"exported the {qat}-quantized {ckpt} in modelopt's unified Hugging Face format to {args.out_dir} "
            "(no logit parity check: transformers does not apply this format's scales; vLLM and "
            "TensorRT-LLM read it)"
        )
        return 0
    info = export_hf(
        args.checkpoint,
        args.out_dir,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        allow_sliding_window_mismatch=args.allow_sliding_window_mismatch,
    )
    print(
        f"exported {info['source']['checkpoint']} (iteration {info['source']['iteration']}, "
        f"{info['parameters']:,} parameters, {info['dtype']}) to {args.out_dir}"
    )
    return 0


# --------------------------------------------------------------------------------------
# Checks done before anything is loaded or written
# --------------------------------------------------------------------------------------


def check_window(cfg: "Config", allow_mismatch: bool) -> Optional[str]:
    """None when transformers can express the model's attention exactly; otherwise the
    description of the approximation (``allow_mismatch``) or an ExportError.

    transformers' Mixtral (the MoE family) has one ``sliding_window`` for every layer and no
    per-layer list (``layer_types``); LLaMA and GPT-2 have no window at all. So a window on
    ``all`` layers of an MoE model is exact, and anything else cannot be expressed."""
    from models.hf_convert import hf_family

    m = cfg.model
    if not m.sliding_window:
        return None
    family = hf_family(m)
    if family == "mixtral" and m.sliding_window_layers == "all":
        return None
    where = "applies one window to every layer or none" if family == "mixtral" else "has no sliding window"
    consequence = (
        f"full causal attention on every layer: the same logits up to {m.sliding_window} tokens of context, "
        "different beyond"
    )
    if allow_mismatch:
        return consequence
    raise ExportError(
        f"the model has a {m.sliding_window}-token sliding window on {m.sliding_window_layers} layers; transformers' "
        f"{family} {where}, so it cannot express that; --allow-sliding-window-mismatch exports it with {consequence}"
    )


def parity_prompt(cfg: "Config", tok: Optional["Tokenizer"], length: int) -> List[int]:
    """The first ``length`` token ids of ``PARITY_CONVERSATION`` in the data's chat template
    (token ids ``0..length-1`` when the checkpoint has no tokenizer)."""
    if tok is None:
        return [i % cfg.model.vocab_size for i in range(length)]
    from engine.data.chat_template import get_chat_template

    pieces = get_chat_template(cfg.data.chat_template).encode(tok, PARITY_CONVERSATION, add_generation_prompt=True)
    ids = [i for p, _, _ in pieces for i in p]
    return ids[:length]


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def _logits(forward, ids: Sequence[int], vocab: int) -> "torch.Tensor":
    import torch

    with torch.no_grad():
        return forward(torch.tensor([list(ids)], dtype=torch.long))[0, :, :vocab].float()


def _engine_logits(model, ids: Sequence[int], vocab: int) -> "torch.Tensor":
    import torch

    def forward(tokens):
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        return model(tokens, pos, None)

    return _logits(forward, ids, vocab)


def _round_to(model, dtype: "torch.dtype") -> None:
    """Round the (fp32) parameters to ``dtype``'s values in place, staying fp32."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def _drain_weights(model, dtype: "torch.dtype") -> Dict[str, object]:
    """The model's state dict in ``dtype``, releasing each fp32 parameter as soon as its
    copy exists, so the model and its converted copy never coexist in full."""
    import torch

    params = dict(model.named_parameters())
    sd = model.state_dict()
    out: Dict[str, object] = {}
    for key in list(sd):
        value = sd.pop(key)
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
            out[key] = value.to(dtype)
            if key in params:
                params[key].data = torch.empty(0, dtype=params[key].dtype)
        else:
            out[key] = value
        del value
    return out


def _hf_model(cfg: "Config", hf_sd, config):
    """The transformers model holding ``hf_sd`` (built on the meta device, tensors assigned:
    no second copy, no random initialisation)."""
    import torch

    from models.hf_convert import hf_model_class

    with torch.device("meta"):
        model = hf_model_class(cfg.model)(config)
    model.load_state_dict(hf_sd, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _generation_config(tok: Optional["Tokenizer"], turn_ids: List[int]):
    from transformers import GenerationConfig

    if tok is None:
        return GenerationConfig(**SAMPLING_DEFAULTS)
    eos = [tok.eod, *[i for i in turn_ids if i != tok.eod]]
    return GenerationConfig(
        bos_token_id=tok.bos if tok.bos >= 0 else None,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad if tok.pad >= 0 else None,
        **SAMPLING_DEFAULTS,
    )


def _patch_config_json(path: Path, dtype_name: str) -> None:
    """``torch_dtype`` (4.x's key) next to 5.x's ``dtype``."""
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype_name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _versions() -> Dict[str, str]:
    import torch
    import transformers

    import engine

    return {"engine": engine.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


class _Stages:
    """Progress over the export's stages: a tqdm bar on a terminal, one plain line per stage
    in a log file (the stages take seconds to minutes each, a bar would say nothing more)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc="export hf", mininterval=1.0, file=sys.stderr, disable=not self.tty)
        self.done = 0

    def start(self, name: str) -> None:
        if self.done:
            self.bar.update()
        self.done += 1
        if self.tty:
            self.bar.set_postfix_str(name)
        else:
            print(f"export hf [{self.done}/{self.bar.total}]: {name}", file=sys.stderr, flush=True)

    def close(self, finished: bool = False) -> None:
        if finished:
            self.bar.update((self.bar.total or 0) - self.bar.n)
        self.bar.close()


# --------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    allow_sliding_window_mismatch: bool = False,
    parity_tol: float = PARITY_TOL,
) -> Dict[str, Any]:
    """Export ``checkpoint`` (checkpoint or run directory, any saved layout) to ``out_dir``
    as a Hugging Face model; returns the ``engine_export.json`` content.

    Raises ExportError (a ConfigError: one line) for a checkpoint that cannot be exported
    (another architecture, no config.yaml, a corrupt file, a tokenizer of another size, a
    sliding window transformers cannot express) and ParityError when the exported model's
    logits differ from the engine's by more than ``parity_tol``; ``out_dir`` then does not
    exist. Runs on one process on CPU (no GPU needed)."""
    import torch

    from engine import checkpoint as ckpt_lib
    from engine import model_io
    from engine.data.chat_template import end_of_turn_ids, get_chat_template
    from engine.data.tokenizer import load_checkpoint_tokenizer
    from engine.data.tokenizer_hf import write_tokenizer
    from models.hf_convert import ConversionError, hf_config, megatron_to_hf

    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new output directory")
    ckpt = model_io.resolve_checkpoint(checkpoint)
    cfg = model_io.checkpoint_config(ckpt)
    if cfg.precision.qat:
        raise ExportError(
            f"{ckpt} is quantized (precision.qat={cfg.precision.qat}): `python -m engine export hf` writes it "
            "through modelopt's exporter; the parity-checked export and GGUF take the unquantized checkpoint"
        )
    try:
        approximation = check_window(cfg, allow_sliding_window_mismatch)
        tok = load_checkpoint_tokenizer(cfg)
        template = get_chat_template(cfg.data.chat_template)
        turn_ids = end_of_turn_ids(template, tok) if tok is not None else []
        token_ids = (
            {}
            if tok is None
            else {
                "bos_token_id": tok.bos if tok.bos >= 0 else None,
                "eos_token_id": tok.eod,
                "pad_token_id": tok.pad if tok.pad >= 0 else None,
            }
        )
        config = hf_config(cfg.model, allow_sliding_window_mismatch=allow_sliding_window_mismatch, **token_ids)
    except (ConversionError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ExportError(f"{ckpt}: {exc}") from None
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    n_prompt = min(PARITY_TOKENS, cfg.model.sliding_window) if approximation else PARITY_TOKENS
    prompt = parity_prompt(cfg, tok, n_prompt)
    vocab = cfg.model.vocab_size

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    bar = _Stages(5)
    try:
        bar.start("loading the checkpoint")
        loaded = _load(ckpt)
        iteration, chunks = loaded.iteration, loaded.chunks
        bar.start("engine logits")
        model = chunks[0]
        if torch_dtype != torch.float32:
            _round_to(model, torch_dtype)
        engine_logits = _engine_logits(model, prompt, vocab)
        sd = _drain_weights(model, torch_dtype)
        del model, chunks, loaded
        gc.collect()
        bar.start("mapping and saving")
        try:
            hf_sd = megatron_to_hf(sd, cfg.model, allow_sliding_window_mismatch=allow_sliding_window_mismatch)
        except ConversionError as exc:
            raise ExportError(f"{ckpt}: {exc}") from None
        del sd
        config.dtype = torch_dtype
        hf = _hf_model(cfg, hf_sd, config)
        del hf_sd
        n_params = sum(p.numel() for p in hf.parameters())
        hf.generation_config = _generation_config(tok, turn_ids)
        tmp.mkdir(parents=True)
        hf.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        del hf
        gc.collect()
        _patch_config_json(tmp / "config.json", {"bf16": "bfloat16", "fp32": "float32"}[dtype])
        if tok is not None:
            write_tokenizer(tok, template.to_jinja(), tmp, cfg.model.max_seq_length)
        bar.start("exported model logits")
        diff = _exported_diff(tmp, cfg, prompt, engine_logits)
        bar.start("engine_export.json")
        info = {
            "source": {"checkpoint": str(ckpt), "iteration": iteration, "layout": _saved_layout(ckpt)},
            "lineage": ckpt_lib.read_lineage(ckpt),
            "parameters": n_params,
            "config_hash": model_io.config_hash(cfg),
            "architecture": type(config).__name__.replace("Config", ""),
            "dtype": dtype,
            "parity": {
                "max_abs_logit_diff": diff,
                "tolerance": parity_tol,
                "prompt_tokens": len(prompt),
                "compute": "CPU fp32, weights at the export dtype",
            },
            "approximation": approximation,
            "chat_template": cfg.data.chat_template,
            "end_of_turn_ids": turn_ids,
            "versions": _versions(),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        print(
            f"parity: max |engine - exported| logit difference = {diff:.3e} over {len(prompt)} tokens "
            f"(tolerance {parity_tol:.0e})",
            file=sys.stderr,
        )
        if not diff <= parity_tol:
            raise ParityError(
                f"parity failed: the exported model's logits differ from the engine's by {diff:.3e} "
                f"> {parity_tol:.0e}; nothing was written to {out}"
            )
        bar.close(finished=True)
        tmp.rename(out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _load(ckpt: Path):
    """``model_io.load_model`` in fp32; weights that do not fit the model the checkpoint's
    config.yaml describes (another architecture's checkpoint) are one ExportError line."""
    import torch
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from engine import model_io

    try:
        return model_io.load_model(ckpt, torch.float32)
    except (CheckpointingException, CheckpointException, KeyError, RuntimeError) as exc:
        # torch's CheckpointException wraps the rank's traceback: its last line is the cause.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = lines[-1] if lines else type(exc).__name__
        raise ExportError(f"{ckpt}: its weights do not fit the model its config.yaml describes ({cause})") from None


def _saved_layout(ckpt: Path) -> Dict[str, Any]:
    from engine.model_io import checkpoint_config

    p = checkpoint_config(ckpt).parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline, "expert": p.expert}


def _exported_diff(path: Path, cfg: "Config", prompt: Sequence[int], engine_logits) -> float:
    """Load ``path`` with transformers in fp32 and return max |its logits - the engine's|."""
    import torch

    from models.hf_convert import hf_model_class

    hf = hf_model_class(cfg.model).from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    hf_logits = _logits(lambda t: hf(input_ids=t).logits, prompt, cfg.model.vocab_size)
    return float((hf_logits - engine_logits).abs().max())

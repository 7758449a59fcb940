"""`python -m engine generate CHECKPOINT (--prompt TEXT | --prompts FILE)`: text from a checkpoint.

The prompt becomes a user turn of the run's chat template (``--no-chat-template``: plain
text); tokens are streamed to the terminal as they are generated; ``--output`` writes one
JSON record per prompt. Runs on one process, or under torchrun on the checkpoint's
tensor x pipeline layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

from engine.config import ConfigError


def register(subparsers) -> None:
    """Add the ``generate`` sub-command."""
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (greedy or sampled, streamed)")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="file of prompts: one per line, or .jsonl records with a 'prompt' key")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per prompt (128)")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="most likely token each step (the default unless a sampling option is given)",
    )
    p.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float, help="sample from the smallest set reaching this probability")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed; prompt i uses seed + i (1234)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument("--system", help="system message put before the prompt (chat template only)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the run's data.tokenizer)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (1: streamed one after another)")
    p.add_argument("--output", help="write one JSON record per prompt to this .jsonl file")
    p.add_argument("--quiet", action="store_true", help="do not stream the text to the terminal")
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> List[str]:
    """The prompts of ``--prompt`` or ``--prompts FILE`` (ConfigError naming a bad line)."""
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ConfigError(f"{path}:{n}: a record needs a string 'prompt'")
        prompts.append(record["prompt"])
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def options_from_args(args: argparse.Namespace):
    """GenerationOptions from the flags: sampling when any sampling flag is given."""
    from engine.inference import GenerationOptions

    sampling = {
        k: v
        for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
        if v is not None
    }
    if args.greedy and sampling:
        raise ConfigError(f"--greedy contradicts --{'/--'.join(k.replace('_', '-') for k in sampling)}")
    return GenerationOptions(
        greedy=not sampling,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        batch_size=args.batch_size,
        **sampling,
    ).check()


def _terminal_stream(prompts: List[str]) -> Callable[[int, str], None]:
    """Print each prompt's header once, then its text as it comes."""
    shown = set()

    def stream(index: int, text: str) -> None:
        if index not in shown:
            shown.add(index)
            sys.stdout.write(f"\n>>> [{index}] {prompts[index]}\n")
        sys.stdout.write(text)
        sys.stdout.flush()

    return stream


def write_jsonl(path: Path, records: List[Dict]) -> None:
    """All records, or nothing: written to a temporary sibling, renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Load, generate, stream and record."""
    import torch

    from engine.inference import load_generator

    prompts = read_prompts(args)
    options = options_from_args(args)  # before loading: bad flags fail in a second
    gen = load_generator(args.checkpoint, tokenizer=args.tokenizer)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    chat = not args.no_chat_template
    ids = [gen.encode(p, chat, args.system) for p in prompts]
    stream = None if args.quiet or not rank0 else _terminal_stream(prompts)
    start = time.perf_counter()
    from engine.inference import generate

    results = generate(
        gen.loaded.chunks,
        gen.tokenizer,
        ids,
        options,
        stream=stream,
        stops=gen.stops,
        vocab_size=gen.cfg.model.vocab_size,
    )
    seconds = time.perf_counter() - start
    if not rank0:
        return 0
    new_tokens = sum(len(r.tokens) for r in results)
    if stream is not None:
        sys.stdout.write("\n")
    reasons = ", ".join(f"[{i}] {r.finished_by} after {len(r.tokens)}" for i, r in enumerate(results))
    print(
        f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s): {reasons}",
        file=sys.stderr,
    )
    if args.output:
        records = [
            {
                "prompt": p,
                "prompt_tokens": len(i),
                "text": r.text,
                "tokens": r.tokens,
                "finished_by": r.finished_by,
                "checkpoint": str(gen.loaded.checkpoint),
                "options": vars(options),
            }
            for p, i, r in zip(prompts, ids, results)
        ]
        write_jsonl(Path(args.output), records)
        print(f"wrote {len(records)} records to {args.output}", file=sys.stderr)
    return 0

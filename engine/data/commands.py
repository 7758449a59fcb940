"""CLI sub-commands of the data pipeline: `tokenizer train|check`, `preprocess`, `data merge|inspect`.

``engine.cli`` calls :func:`register`; each sub-command sets ``func(args) -> int``.
Heavy imports happen inside the handlers so ``python -m engine --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.data.readers import TEXT_DOC_LINE, TEXT_DOC_MODES


def _add_text_docs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-docs",
        choices=TEXT_DOC_MODES,
        default=TEXT_DOC_LINE,
        help="how plain-text files are cut into documents (default: one per line)",
    )


def _positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (a one-line error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    """Add the `tokenizer`, `preprocess` and `data` sub-commands."""
    from engine.data.tokenizer import DEFAULT_VOCAB_MULTIPLE
    from engine.data.tokenizer_train import DEFAULT_NORMALIZATION, DEFAULT_SPECIAL_TOKENS, NORMALIZATIONS

    # --- tokenizer ------------------------------------------------------------------------
    tok = subparsers.add_parser("tokenizer", help="train or check a SentencePiece tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tok_sub.required = True

    train = tok_sub.add_parser("train", help="train a tokenizer (writes tokenizer.model/.json/_meta.json)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    train.add_argument("--output-dir", required=True)
    train.add_argument(
        "--vocab-size",
        type=_positive_int,
        required=True,
        help="pieces to train; an error names the largest size the input supports if it is less",
    )
    train.add_argument(
        "--allow-smaller-vocab",
        action="store_true",
        help="keep a tokenizer smaller than --vocab-size when the input supports fewer pieces "
        "(a warning says the size produced)",
    )
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument(
        "--special-tokens",
        nargs="*",
        default=list(DEFAULT_SPECIAL_TOKENS),
        help="extra tokens reserved as single pieces (default: ChatML tokens); "
        "<unk> <s> </s> <pad> are always reserved",
    )
    train.add_argument(
        "--vocab-multiple",
        type=int,
        default=DEFAULT_VOCAB_MULTIPLE,
        help="pad the vocabulary size to a multiple of this (default 128)",
    )
    train.add_argument("--json-key", default="text")
    train.add_argument(
        "--input-sentence-size", type=int, default=0, help="sample this many lines for training (0: use all)"
    )
    train.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--no-split-digits", dest="split_digits", action="store_false")
    train.add_argument("--normalization", choices=NORMALIZATIONS, default=DEFAULT_NORMALIZATION)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument(
        "--num-threads",
        type=int,
        default=8,
        help="training threads; the result depends on it, so it is fixed by default",
    )
    train.add_argument(
        "--lint-input",
        nargs="*",
        default=None,
        metavar="FILE",
        help="sample for the automatic lint (default: the training input)",
    )
    _add_text_docs(train)
    train.set_defaults(func=cmd_tokenizer_train)

    check = tok_sub.add_parser("check", help="lint a tokenizer: round trips, <unk> rate, coverage")
    check.add_argument("--tokenizer", required=True, metavar="DIR_OR_MODEL")
    check.add_argument(
        "--input",
        nargs="*",
        default=None,
        metavar="FILE",
        help="sample documents (default: the bundled sample corpus, if present)",
    )
    check.add_argument("--json-key", default="text")
    check.add_argument("--max-docs", type=int, default=1000)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_tokenizer_check)

    # --- preprocess -------------------------------------------------------------------------
    pre = subparsers.add_parser("preprocess", help="tokenize text into megatron .bin/.idx files")
    pre.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    pre.add_argument("--tokenizer", required=True, metavar="DIR_OR_MODEL")
    pre.add_argument("--output-prefix", required=True)
    pre.add_argument("--workers", type=int, default=1)
    pre.add_argument("--json-key", default="text")
    pre.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed / empty / non-UTF-8 records and count them in the sidecar",
    )
    pre.add_argument("--shard-docs", type=int, default=0, help="start a new shard every N documents")
    pre.add_argument(
        "--kind",
        choices=("pretrain", "sft", "preference"),
        default="pretrain",
        help="pretrain: plain documents; sft: Alpaca or messages JSONL; "
        "preference: {prompt, chosen, rejected} JSONL (both with a loss mask)",
    )
    pre.add_argument(
        "--chat-template",
        default="chatml",
        help="sft/preference: chatml, alpaca or a .jinja file (must match data.chat_template)",
    )
    pre.add_argument(
        "--seq-length",
        type=int,
        default=2048,
        help="sft/preference: training sequence length; longer records are cut prompt-first",
    )
    pre.add_argument("--no-progress", dest="progress", action="store_false")
    _add_text_docs(pre)
    pre.set_defaults(func=cmd_preprocess)

    # --- data ---------------------------------------------------------------------------------
    data = subparsers.add_parser("data", help="merge or inspect indexed datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    merge = data_sub.add_parser("merge", help="concatenate datasets (e.g. shards) into one")
    merge.add_argument("--inputs", nargs="+", required=True, metavar="PREFIX")
    merge.add_argument("--output-prefix", required=True)
    merge.set_defaults(func=cmd_data_merge)
    insp = data_sub.add_parser("inspect", help="print statistics and decode sample documents")
    insp.add_argument("prefix")
    insp.add_argument(
        "--tokenizer", default=None, metavar="DIR_OR_MODEL", help="default: the tokenizer path recorded in the sidecar"
    )
    insp.add_argument("--num-docs", type=int, default=3)
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=cmd_data_inspect)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cmd_tokenizer_train(args) -> int:
    """Train, write the three files, then lint and print the report (exit 1 if it fails)."""
    from engine.data.readers import InputError
    from engine.data.tokenizer import load_tokenizer
    from engine.data.tokenizer_lint import format_report, lint_tokenizer, load_samples
    from engine.data.tokenizer_train import train_tokenizer

    try:
        meta = train_tokenizer(
            args.input,
            args.output_dir,
            args.vocab_size,
            model_type=args.model_type,
            special_tokens=args.special_tokens,
            vocab_multiple=args.vocab_multiple,
            json_key=args.json_key,
            input_sentence_size=args.input_sentence_size,
            byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage,
            split_digits=args.split_digits,
            normalization=args.normalization,
            seed=args.seed,
            num_threads=args.num_threads,
            text_docs=args.text_docs,
            allow_smaller_vocab=args.allow_smaller_vocab,
        )
    except (InputError, ValueError) as exc:
        return _error(str(exc))
    if meta["trained_vocab_size"] < meta["requested_vocab_size"]:
        print(
            f"WARNING: the input supports only {meta['trained_vocab_size']} pieces; trained that many instead of "
            f"the {meta['requested_vocab_size']} asked (--allow-smaller-vocab)",
            file=sys.stderr,
        )
    print(
        f"wrote {args.output_dir}/tokenizer.model, tokenizer.json, tokenizer_meta.json: "
        f"{meta['trained_vocab_size']} pieces, padded to {meta['vocab_size']} "
        f"(multiple of {meta['vocab_multiple']}), sha256 {meta['sha256'][:16]}"
    )
    report = lint_tokenizer(load_tokenizer(args.output_dir), load_samples(args.lint_input or args.input, args.json_key))
    print(format_report(report))
    return 0 if report["ok"] else 1


def cmd_tokenizer_check(args) -> int:
    """Lint a tokenizer; exit 1 when round trips fail or a byte-fallback model emits <unk>."""
    from engine.data.readers import InputError
    from engine.data.tokenizer import TokenizerError, load_tokenizer
    from engine.data.tokenizer_lint import default_sample_path, format_report, lint_tokenizer, load_samples

    try:
        tok = load_tokenizer(args.tokenizer)
        inputs = args.input or ([str(default_sample_path())] if default_sample_path() else [])
        samples = load_samples(inputs, args.json_key, args.max_docs) if inputs else []
    except (InputError, TokenizerError) as exc:
        return _error(str(exc))
    report = lint_tokenizer(tok, samples, max_docs=args.max_docs)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_preprocess(args) -> int:
    """Tokenize inputs into PREFIX.bin/.idx/.json; exit 1 on bad input (nothing final written)."""
    from engine.data.preprocess import PreprocessError, preprocess
    from engine.data.readers import BadRecord, InputError
    from engine.data.tokenizer import TokenizerError

    try:
        summary = preprocess(
            args.input,
            args.tokenizer,
            args.output_prefix,
            workers=args.workers,
            json_key=args.json_key,
            skip_bad=args.skip_bad,
            shard_docs=args.shard_docs,
            kind=args.kind,
            text_docs=args.text_docs,
            progress=args.progress,
            chat_template=args.chat_template,
            seq_length=args.seq_length,
        )
    except (PreprocessError, BadRecord, InputError, TokenizerError, ValueError) as exc:
        return _error(f"{exc}\nno output written")
    mb = summary["input_bytes"] / 1e6
    secs = max(summary["seconds"], 1e-9)
    print(
        f"{summary['documents']} documents, {summary['tokens']} tokens from {mb:.1f} MB in {secs:.1f}s "
        f"({mb / secs:.2f} MB/s, {summary['tokens'] / secs:,.0f} tokens/s); "
        f"skipped {sum(summary['skipped'].values())} {summary['skipped'] or ''}"
    )
    for p in summary["prefixes"]:
        print(f"  {p}.bin / .idx / .json")
    return 0


def cmd_data_merge(args) -> int:
    """Merge datasets into one prefix."""
    from engine.data.merge import MergeError, merge_datasets

    try:
        sidecar = merge_datasets(args.inputs, args.output_prefix)
    except MergeError as exc:
        return _error(str(exc))
    print(
        f"{args.output_prefix}: {sidecar['documents']} documents, {sidecar['tokens']} tokens "
        f"from {len(sidecar['merged_from'])} inputs"
    )
    return 0


def cmd_data_inspect(args) -> int:
    """Print statistics (and problems) of a dataset; exit 1 when problems are found."""
    from engine.data.indexed_writer import read_sidecar
    from engine.data.inspect_data import format_inspection, inspect_dataset
    from engine.data.merge import normalize_prefix

    try:
        stats = inspect_dataset(args.prefix, args.tokenizer, args.num_docs)
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print(format_inspection(stats, read_sidecar(normalize_prefix(args.prefix))))
    return 1 if stats["problems"] else 0

"""``python -m engine preprocess --kind sft|preference``: JSONL conversations -> tokens + loss mask.

SFT records are either Alpaca (``instruction``, optional ``input``, ``output``) or
``messages`` (``[{role, content}]``, multi-turn, optional leading system message). Preference
records are ``{prompt, chosen, rejected}``, each a string or a message list (a list for
``chosen``/``rejected`` holds assistant messages; any messages before its last one must be
the same in both and are appended to the prompt).

Every record goes through the chat template (:mod:`engine.data.chat_template`). A record
longer than ``seq_length + 1`` tokens (a sequence of ``seq_length`` inputs predicts the
next ``seq_length`` tokens) is cut on the prompt side first — non-assistant content,
earliest message first, from its end — so the response and its EOS survive; a record
whose responses alone do not fit is dropped and counted (``too_long``), as are records
with an empty response (``empty_response``, the ORPO NaN of the seed run) or a wrong shape
(``bad_record``, an error unless ``--skip-bad``). Layout on disk: :mod:`engine.data.chat_data`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from engine.data import readers
from engine.data.chat_data import PROMPT, RESPONSE, ChatWriter
from engine.data.chat_template import ChatTemplate, ChatTemplateError, get_chat_template
from engine.data.indexed_writer import SIDECAR_FORMAT_VERSION, token_dtype
from engine.data.preprocess_common import PreprocessError, tool_version
from engine.data.tokenizer import load_tokenizer

Pieces = List[Tuple[List[int], bool, bool]]  # (ids, loss, truncatable), see ChatTemplate.encode
MAX_EXAMPLES = 20


class SkipRecord(Exception):
    """A record that is dropped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# --- record shapes ------------------------------------------------------------------------
def sft_messages(rec: Dict) -> List[Dict]:
    """Messages of one SFT record (Alpaca or messages form)."""
    if "messages" in rec:
        msgs = rec["messages"]
    elif "instruction" in rec and "output" in rec:
        user = {"role": "user", "content": str(rec["instruction"])}
        if rec.get("input"):
            user["input"] = str(rec["input"])
        msgs = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            user,
            {"role": "assistant", "content": str(rec["output"])},
        ]
    else:
        raise SkipRecord("bad_record", "neither 'messages' nor Alpaca 'instruction'/'output' fields")
    if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        raise SkipRecord("bad_record", "no assistant message")
    if any(m.get("role") == "assistant" and not str(m.get("content", "")).strip() for m in msgs if isinstance(m, dict)):
        raise SkipRecord("empty_response", "an assistant message is empty")
    return msgs


def _as_messages(value, role: str) -> List[Dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise SkipRecord("bad_record", f"expected a string or a message list, got {type(value).__name__}")


def preference_parts(rec: Dict) -> Tuple[List[Dict], str, str]:
    """(prompt messages, chosen text, rejected text) of one preference record."""
    if not all(k in rec for k in ("prompt", "chosen", "rejected")):
        raise SkipRecord("bad_record", "needs 'prompt', 'chosen' and 'rejected'")
    prompt = _as_messages(rec["prompt"], "user")
    chosen, rejected = _as_messages(rec["chosen"], "assistant"), _as_messages(rec["rejected"], "assistant")
    if chosen[:-1] != rejected[:-1]:
        raise SkipRecord("bad_record", "chosen and rejected differ before their last message")
    prompt = prompt + chosen[:-1]
    responses = []
    for msgs in (chosen, rejected):
        last = msgs[-1] if msgs else {}
        if not isinstance(last, dict) or last.get("role", "assistant") != "assistant":
            raise SkipRecord("bad_record", "the last chosen/rejected message must be the assistant's")
        text = last.get("content")
        if not isinstance(text, str) or not text.strip():
            raise SkipRecord("empty_response", "chosen or rejected response is empty")
        responses.append(text)
    return prompt, responses[0], responses[1]


# --- truncation ---------------------------------------------------------------------------
def fit_prompt(pieces: Pieces, excess: int) -> Optional[Pieces]:
    """Remove ``excess`` tokens from truncatable pieces (earliest first, from their end);
    None when they hold fewer than ``excess`` tokens."""
    if excess <= 0:
        return pieces
    if sum(len(ids) for ids, _, trunc in pieces if trunc) < excess:
        return None
    out = []
    for ids, loss, trunc in pieces:
        if trunc and excess > 0:
            cut = min(excess, len(ids))
            ids, excess = ids[: len(ids) - cut], excess - cut
        out.append((ids, loss, trunc))
    return out


def flatten(pieces: Pieces, loss_value: int = 1, other_value: int = 0) -> Tuple[List[int], List[int]]:
    """Token ids and mask values of pieces."""
    ids, mask = [], []
    for p, loss, _ in pieces:
        ids.extend(p)
        mask.extend([loss_value if loss else other_value] * len(p))
    return ids, mask


def encode_sft(template: ChatTemplate, tok, rec: Dict, limit: int) -> Tuple[List[int], List[int], bool]:
    """(ids, mask, truncated) of one SFT record cut to ``limit`` tokens."""
    try:
        pieces = template.encode(tok, sft_messages(rec))
    except ChatTemplateError as exc:
        raise SkipRecord("bad_record", str(exc)) from None
    total = sum(len(p) for p, _, _ in pieces)
    fitted = fit_prompt(pieces, total - limit)
    if fitted is None:
        raise SkipRecord("too_long", f"{total} tokens, the responses alone exceed {limit}")
    ids, mask = flatten(fitted)
    return ids, mask, total > limit


def encode_preference(template: ChatTemplate, tok, rec: Dict, limit: int):
    """([(chosen ids, mask), (rejected ids, mask)], truncated) of one preference record."""
    prompt_msgs, chosen, rejected = preference_parts(rec)
    try:
        prompt = template.encode(tok, prompt_msgs, add_generation_prompt=True)
        responses = []
        for text in (chosen, rejected):
            full = template.encode(tok, prompt_msgs + [{"role": "assistant", "content": text}])
            if [p for p, _, _ in full[: len(prompt)]] != [p for p, _, _ in prompt]:
                raise ChatTemplateError("the generation prompt is not a prefix of the conversation")
            responses.append([(ids, loss, False) for ids, loss, _ in full[len(prompt) :]])
    except ChatTemplateError as exc:
        raise SkipRecord("bad_record", str(exc)) from None
    prompt_len = sum(len(p) for p, _, _ in prompt)
    longest = max(sum(len(p) for p, _, _ in r) for r in responses)
    fitted = fit_prompt(prompt, prompt_len + longest - limit)
    if fitted is None:
        raise SkipRecord("too_long", f"prompt {prompt_len} + response {longest} tokens exceed {limit}")
    p_ids, _ = flatten(fitted)
    seqs = []
    for r in responses:
        r_ids, r_mask = flatten(r, RESPONSE, PROMPT)
        seqs.append((p_ids + r_ids, [PROMPT] * len(p_ids) + r_mask))
    return seqs, prompt_len + longest > limit


# --- the run ------------------------------------------------------------------------------
def preprocess_chat(
    inputs: Sequence[str],
    tokenizer: str,
    output_prefix: str,
    kind: str,
    chat_template: str = "chatml",
    seq_length: int = 2048,
    skip_bad: bool = False,
) -> dict:
    """Tokenize JSONL ``inputs`` into ``output_prefix`` (+ ``_lossmask``); returns a summary."""
    if seq_length < 2:
        raise ValueError("--seq-length must be >= 2")
    template = get_chat_template(chat_template)
    tok = load_tokenizer(tokenizer)
    files = readers.expand_inputs(inputs)
    limit = seq_length + 1
    writer = ChatWriter(output_prefix, token_dtype(tok.vocab_size))
    skipped: Dict[str, int] = {}
    examples: List[str] = []
    truncated = docs = tokens = loss_tokens = 0
    started = time.time()
    try:
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise SkipRecord("bad_record", f"malformed JSON: {exc}") from None
                        if not isinstance(rec, dict):
                            raise SkipRecord("bad_record", "a record must be a JSON object")
                        if kind == "sft":
                            ids, mask, cut = encode_sft(template, tok, rec, limit)
                            seqs = [(ids, mask)]
                        else:
                            seqs, cut = encode_preference(template, tok, rec, limit)
                    except SkipRecord as exc:
                        if exc.reason == "bad_record" and not skip_bad:
                            raise PreprocessError(
                                f"{path}:{line_no}: {exc}  (use --skip-bad to skip bad records)"
                            ) from None
                        skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                        if len(examples) < MAX_EXAMPLES:
                            examples.append(f"{path}:{line_no}: {exc.reason}: {exc}")
                        continue
                    writer.add_document(seqs)
                    docs += 1
                    truncated += int(cut)
                    tokens += sum(len(s) for s, _ in seqs)
                    loss_tokens += sum(int(v == (1 if kind == "sft" else RESPONSE)) for _, m in seqs for v in m)
        if docs == 0:
            raise PreprocessError(f"no usable records in {', '.join(map(str, files))} (skipped: {skipped})")
        summary = {
            "documents": docs,
            "tokens": tokens,
            "loss_tokens": loss_tokens,
            "truncated": truncated,
            "skipped": skipped,
            "seconds": round(time.time() - started, 3),
            "prefixes": [output_prefix],
            "input_bytes": sum(os.path.getsize(f) for f in files),
        }
        writer.commit(
            {
                "format_version": SIDECAR_FORMAT_VERSION,
                "tool": tool_version(),
                "kind": kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "chat_template": template.name,
                "chat_template_fingerprint": template.fingerprint,
                "seq_length": seq_length,
                "tokenizer": {
                    "sha256": tok.sha256,
                    "vocab_size": tok.vocab_size,
                    "eod": tok.eod,
                    "path": os.path.abspath(tok.path) if tok.path else "",
                },
                "dtype": writer.tokens.dtype.__name__
                if hasattr(writer.tokens.dtype, "__name__")
                else str(writer.tokens.dtype),
                "documents": docs,
                "sequences": writer.sequences,
                "tokens": tokens,
                "loss_tokens": loss_tokens,
                "truncated_prompts": truncated,
                "skipped": skipped,
                "skipped_total": sum(skipped.values()),
                "skipped_examples": examples,
                "source_files": [str(f) for f in files],
            }
        )
    except BaseException:
        writer.abort()
        raise
    return summary

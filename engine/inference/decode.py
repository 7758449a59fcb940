"""The decode loop: megatron-core's inference wrapper and KV cache, our sampling and stopping.

Each batch of prompts runs through megatron-core's ``GPTInferenceWrapper`` (it moves
activations between pipeline stages and gathers tensor-parallel logits) with a
``StaticInferenceContext`` (the per-layer KV cache). Like megatron's own static-batch
controller, the first step encodes every prompt up to the shortest one's length; each
later step feeds one position, where rows still inside their prompt keep their prompt token
and the others take the token just chosen, so prompts of different lengths share the batch
without padding masks. The next token is chosen by ``engine.inference.sampling`` on the
last pipeline stage and sent to the other stages.

Why not megatron-core's ``TextGenerationController`` / ``StaticInferenceEngine`` (0.16.1):
its sampler asserts ``not (top_k > 0 and top_p > 0.0)`` (the model cards sample with both),
has no repetition penalty, and its static batch stops only at ``tokenizer.eod`` (not at a
chat template's end of turn); on CPU it also fails in ``broadcast_from_last_pipeline_stage``
(``assert tensor.is_cuda``) at PP > 1 and computes per-token latency with
``torch.cuda.Event.elapsed_time``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Literal, Optional, Sequence

import torch

from engine.config import ConfigError
from engine.inference.sampling import GenerationOptions, next_tokens, row_generators

FinishReason = Literal["eos", "end_of_turn", "stop", "length"]
StreamFn = Callable[[int, str], None]
"""``stream(prompt_index, text)``: called with each new piece of decoded text (rank 0 only)."""


@dataclass
class GenerationResult:
    """One prompt's continuation."""

    tokens: List[int]
    """Generated ids, the stop token included when one ended the generation (as transformers)."""
    text: str
    """Decoded generated text, without the stop token."""
    finished_by: FinishReason
    """``eos``, ``end_of_turn`` (the chat template's marker), ``stop`` (an extra stop id) or
    ``length`` (``max_new_tokens`` or the model's ``max_seq_length`` reached)."""


@dataclass(frozen=True)
class StopTokens:
    """Which ids end a generation, and what each is called in ``finished_by``."""

    eos: Optional[int]
    """The tokenizer's EOS id (``finished_by="eos"``)."""
    end_of_turn: Sequence[int] = ()
    """The chat template's end-of-turn ids, e.g. ChatML's ``<|im_end|>`` (``end_of_turn``)."""
    extra: Sequence[int] = ()
    """Further stop ids (``stop``)."""

    def reason(self, token: int) -> Optional[FinishReason]:
        """Why ``token`` ends the generation, or None when it does not."""
        if token == self.eos:
            return "eos"
        if token in self.end_of_turn:
            return "end_of_turn"
        if token in self.extra:
            return "stop"
        return None


class _Decoder:
    """Incremental detokenisation: the text a new token adds (SentencePiece pieces join
    with spaces and byte-fallback pieces only become text together, so decode the whole
    continuation and emit the new suffix; a trailing incomplete character waits)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def _parallel_state():
    from megatron.core import parallel_state as ps

    return ps


def _is_last_stage() -> bool:
    return _parallel_state().is_pipeline_last_stage(ignore_virtual=True)


def _share_from_last_stage(tokens: torch.Tensor) -> torch.Tensor:
    """The last pipeline stage's ``tokens`` on every stage (a no-op without pipelining)."""
    ps = _parallel_state()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tokens
    torch.distributed.broadcast(
        tokens, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group()
    )
    return tokens


def _wrapper(model: Any, batch: int, seq: int, vocab: int):
    """megatron-core's inference wrapper around ``model`` with a fresh KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    params_dtype = next(model.parameters()).dtype
    config = InferenceWrapperConfig(
        hidden_size=model.config.hidden_size,
        params_dtype=params_dtype,
        inference_batch_times_seqlen_threshold=-1,  # whole batch per step: no micro-batching
        padded_vocab_size=vocab,
        inference_max_requests=batch,
        inference_max_seq_length=seq,
        fp32_residual_connection=bool(getattr(model.config, "fp32_residual_connection", False)),
    )
    wrapper = GPTInferenceWrapper(model, config, StaticInferenceContext(batch, seq))
    wrapper.prep_model_for_inference()
    return wrapper


def _history(buf: torch.Tensor, end: int, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's sequence so far, ``buf[:, :end]``; positions a row has not reached yet
    (still in its prompt) repeat its first token, which the repetition penalty treats as
    already counted (penalising a token is idempotent)."""
    hist = buf[:, :end].clone()
    valid = torch.arange(end).unsqueeze(0) < torch.maximum(lengths, torch.tensor(end)).unsqueeze(1)
    # Rows whose prompt is longer than ``end`` have all of ``[:end]`` valid already.
    return torch.where(valid, hist, hist[:, :1])


@torch.inference_mode()
def _generate_batch(
    model: Any,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    stops: StopTokens,
    max_seq_length: int,
    vocab: int,
    generators: Sequence[torch.Generator],
    stream: Optional[Callable[[int, str], None]],
) -> List[GenerationResult]:
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    total = min(int(lengths.max()) + options.max_new_tokens, max_seq_length)
    buf = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    wrapper = _wrapper(model, b, total, int(model.vocab_size))
    inputs = wrapper.prep_inference_input(buf)  # holds ``buf`` itself: chosen tokens appear in it
    generated: List[List[int]] = [[] for _ in range(b)]
    finished: List[Optional[FinishReason]] = [None] * b
    decoders = [_Decoder(tokenizer) for _ in range(b)]
    start, end = 0, int(lengths.min())
    while True:
        window = wrapper.get_batch_for_context_window(inputs, start, end)
        logits = wrapper.run_one_forward_step(window)
        # Rows that take a token at ``end``: not done, and past their prompt. Only they sample,
        # so a row's generator draws once per token it generates, whatever its batch.
        rows = [i for i in range(b) if finished[i] is None and int(lengths[i]) <= end]
        chosen = torch.zeros(len(rows), dtype=torch.long)
        if rows and _is_last_stage():
            # Only the real vocabulary: padded embedding rows are never tokens.
            scores = logits[rows, -1, :vocab]
            chosen = next_tokens(scores, _history(buf, end, lengths)[rows], options, [generators[i] for i in rows])
        if rows:  # (every rank knows ``rows``: all hold the same ``buf``)
            chosen = _share_from_last_stage(chosen)
        for i, token in zip(rows, chosen.tolist()):
            buf[i, end] = token
            generated[i].append(token)
            finished[i] = stops.reason(token)
            if finished[i] is None and (len(generated[i]) >= options.max_new_tokens or end + 1 >= max_seq_length):
                finished[i] = "length"
            if stream is not None and finished[i] not in ("eos", "end_of_turn", "stop"):
                delta = decoders[i].push(token)
                if delta:
                    stream(i, delta)
        if all(f is not None for f in finished):
            break
        start, end = end, end + 1
        if end >= int(lengths.max()):  # every prompt is encoded: one position per step from now on
            wrapper.inference_context.enable_decode_mode()
    results = []
    for i in range(b):
        reason = finished[i]
        assert reason is not None
        text_ids = generated[i][:-1] if reason in ("eos", "end_of_turn", "stop") else generated[i]
        results.append(GenerationResult(tokens=generated[i], text=tokenizer.decode(text_ids), finished_by=reason))
    return results


def check_prompts(prompts: Sequence[Sequence[int]], max_seq_length: int) -> None:
    """ConfigError (one line) for an empty prompt or one that leaves no room to generate."""
    if not prompts:
        raise ConfigError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ConfigError(f"prompt {i} is empty (no tokens)")
        if len(p) >= max_seq_length:
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens; the model's max_seq_length is {max_seq_length}, "
                "which leaves no room to generate"
            )


def generate(
    model_chunks: Sequence[torch.nn.Module],
    tokenizer,
    prompts: List[List[int]],
    options: GenerationOptions,
    stream: Optional[StreamFn] = None,
    stops: Optional[StopTokens] = None,
    vocab_size: Optional[int] = None,
) -> List[GenerationResult]:
    """Continue each prompt (token ids) with ``model_chunks`` (this rank's chunk of a model
    loaded by ``engine.model_io.load_model``, at any TP/PP layout; every rank of the layout
    calls this with the same arguments and gets the same results).

    Stops at ``tokenizer.eod``, at ``stops.end_of_turn`` and at ``options.stop_ids``
    (``stops`` default: EOS and the extra ids only). ``stream(prompt_index, text)`` receives
    the decoded text as it is generated, on global rank 0 only. ``vocab_size``: the ids the
    model may produce (``cfg.model.vocab_size``; default the tokenizer's padded size), never
    the embedding's padding rows."""
    options = options.check()
    if len(model_chunks) != 1:
        raise ConfigError(
            f"{len(model_chunks)} model chunks on this rank: generation runs without virtual pipeline stages"
        )
    model: Any = model_chunks[0]  # a megatron-core GPTModel
    max_seq_length = int(model.max_sequence_length)
    check_prompts(prompts, max_seq_length)
    stops = stops or StopTokens(eos=tokenizer.eod)
    stops = StopTokens(stops.eos, stops.end_of_turn, tuple(stops.extra) + tuple(options.stop_ids))
    vocab = min(int(model.vocab_size), int(vocab_size or tokenizer.vocab_size))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        stream = None
    results: List[GenerationResult] = []
    for first in range(0, len(prompts), options.batch_size):
        batch = prompts[first : first + options.batch_size]
        on_text = None if stream is None else (lambda i, text, _first=first: stream(_first + i, text))
        generators = row_generators(options.seed, first, len(batch))
        results += _generate_batch(model, tokenizer, batch, options, stops, max_seq_length, vocab, generators, on_text)
    return results

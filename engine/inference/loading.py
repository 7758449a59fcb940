"""A checkpoint ready to generate: model at a layout, tokenizer, chat template, stop tokens.

``load_generator`` is what the ``generate`` command, evaluation and the quickstart use: the
model is loaded through ``engine.model_io.load_model`` (one process, or the checkpoint's
TP/PP layout under torchrun), the tokenizer is the one the run trained with
(``data.tokenizer`` of its config), and prompts are wrapped in the run's chat template
(``data.chat_template``): the prompt is a user turn and generation starts after the
assistant header, exactly as the SFT data was laid out.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

from engine.config import Config, ConfigError, ParallelConfig
from engine.inference.decode import GenerationResult, StopTokens, StreamFn, generate
from engine.inference.sampling import GenerationOptions

if TYPE_CHECKING:
    from engine.data.chat_template import ChatTemplate
    from engine.data.tokenizer import Tokenizer
    from engine.model_io import LoadedModel


def generation_layout(saved: ParallelConfig, world_size: int) -> Optional[ParallelConfig]:
    """The layout to generate at on ``world_size`` processes: None (TP=PP=1) on one process,
    else the checkpoint's tensor x pipeline layout, which must use every process."""
    if world_size == 1:
        return None
    if saved.tensor * saved.pipeline != world_size:
        raise ConfigError(
            f"generation runs on 1 process or on tensor x pipeline = {saved.tensor} x {saved.pipeline} = "
            f"{saved.tensor * saved.pipeline} processes (the checkpoint's layout), not {world_size}"
        )
    # Inference needs no optimizer sharding, no virtual stages (megatron's inference wrapper
    # refuses interleaving) and no sequence parallelism (refused for dense static batches).
    from engine.model_io import inference_parallel

    return inference_parallel(saved, saved.tensor, saved.pipeline)


def checkpoint_tokenizer(cfg: Config, override: Optional[str] = None) -> "Tokenizer":
    """The tokenizer the run trained with (``data.tokenizer``), or ``override``, checked
    against the model's vocabulary as the export checks it."""
    from engine.data.tokenizer import load_checkpoint_tokenizer

    if override:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=override))
    tok = load_checkpoint_tokenizer(cfg)
    if tok is None:
        raise ConfigError("the checkpoint's config names no tokenizer (data.tokenizer); pass --tokenizer DIR")
    return tok


@dataclass
class Generator:
    """A loaded checkpoint with everything needed to turn text prompts into text."""

    loaded: "LoadedModel"
    """The ``engine.model_io.LoadedModel`` (config, this rank's chunks, checkpoint path)."""
    tokenizer: "Tokenizer"
    """The run's ``engine.data.tokenizer.Tokenizer``."""
    template: "ChatTemplate"
    """The run's ``engine.data.chat_template.ChatTemplate``."""
    stops: StopTokens
    """EOS and the template's end-of-turn id."""

    @property
    def cfg(self) -> Config:
        """The checkpoint's config at the layout it was loaded at."""
        return self.loaded.cfg

    def encode(self, text: str, chat: bool = True, system: Optional[str] = None) -> List[int]:
        """Prompt ids: ``text`` as a user turn plus the assistant header (``chat``), or the
        plain text."""
        if not chat:
            return list(self.tokenizer.encode(text))
        from engine.data.chat_template import ChatTemplateError

        messages: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        try:
            pieces = self.template.encode(self.tokenizer, messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise ConfigError(f"chat template: {exc}") from None
        return [i for ids, _, _ in pieces for i in ids]

    def generate(
        self,
        prompts: Sequence[str],
        options: GenerationOptions,
        stream: Optional[StreamFn] = None,
        chat: bool = True,
        system: Optional[str] = None,
    ) -> List[GenerationResult]:
        """Generate from text prompts (see ``engine.inference.generate``)."""
        ids = [self.encode(p, chat, system) for p in prompts]
        return generate(
            self.loaded.chunks,
            self.tokenizer,
            ids,
            options,
            stream=stream,
            stops=self.stops,
            vocab_size=self.cfg.model.vocab_size,
        )


def load_generator(
    path: str | Path,
    parallel: Optional[ParallelConfig] = None,
    tokenizer: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> Generator:
    """Load checkpoint (or run directory) ``path`` for generation.

    ``parallel`` default: one process (TP=PP=1), or under torchrun the checkpoint's TP x PP
    layout (``generation_layout``). ``tokenizer`` overrides the run's ``data.tokenizer``."""
    from engine.data.chat_template import ChatTemplateError, end_of_turn_ids, get_chat_template
    from engine.model_io import checkpoint_config, load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    saved = checkpoint_config(ckpt)
    tok = checkpoint_tokenizer(saved, tokenizer)  # before the model: a missing tokenizer fails fast
    try:
        template = get_chat_template(saved.data.chat_template)
    except ChatTemplateError as exc:
        raise ConfigError(f"chat template: {exc}") from None
    if parallel is None:
        parallel = generation_layout(saved.parallel, int(os.environ.get("WORLD_SIZE", "1")))
    loaded = load_model(ckpt, dtype=dtype, parallel=parallel)
    # The same end-of-turn ids the export writes into generation_config.json.
    stops = StopTokens(eos=tok.eod, end_of_turn=tuple(end_of_turn_ids(template, tok)))
    return Generator(loaded=loaded, tokenizer=tok, template=template, stops=stops)

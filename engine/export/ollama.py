"""The Ollama ``Modelfile`` written next to an exported GGUF file.

Ollama renders prompts with Go templates, not Jinja, so a chat template has to be
translated. The translation is kept to the engine's built-in templates
(``engine.data.chat_template``), recognised by their exact Jinja source: a Go template
written by hand for each, rendering the same text as the Jinja one with
``add_generation_prompt=True``. A user's own Jinja template has no general translation;
its Modelfile then carries no TEMPLATE, and Ollama falls back to what it derives from the
GGUF's ``tokenizer.chat_template``.

Sampling defaults are the model card's (temperature 0.7, top-p 0.9, top-k 50, repetition
penalty 1.2), or those of the exported ``generation_config.json`` when it sets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

# The seed model cards' sampling defaults.
CARD_SAMPLING: Dict[str, float] = {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repeat_penalty": 1.2}

# generation_config.json key -> Modelfile PARAMETER name.
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}

_CHATML_GO = "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def _alpaca_go(eos_piece: str) -> str:
    from engine.data.chat_template import ALPACA_PREAMBLE

    return (
        '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}\n\n'
        "{{ else }}" + ALPACA_PREAMBLE + "{{ end }}"
        '{{ range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}' + eos_piece + "\n\n{{ end }}{{ end }}"
    )


@dataclass
class ChatFormat:
    """How a chat template looks to llama.cpp and Ollama."""

    name: str
    """The engine's template name (``chatml``, ``alpaca``), or ``custom``."""
    go_template: Optional[str]
    """The Ollama TEMPLATE, or None when there is no translation."""
    end_of_turn: Optional[str] = None
    """The piece that ends an assistant turn, when it is not EOS (``<|im_end|>``)."""
    stops: List[str] = field(default_factory=list)
    """Ollama stop strings, in addition to EOS."""


def chat_format(jinja: Optional[str], eos_piece: str) -> ChatFormat:
    """Recognise ``jinja`` as one of the engine's built-in templates (by its exact source)."""
    from engine.data.chat_template import AlpacaTemplate, ChatMLTemplate

    if jinja == ChatMLTemplate().to_jinja():
        return ChatFormat("chatml", _CHATML_GO, "<|im_end|>", ["<|im_end|>", "<|im_start|>"])
    if jinja == AlpacaTemplate().to_jinja():
        return ChatFormat("alpaca", _alpaca_go(eos_piece), None, ["### Instruction:"])
    return ChatFormat("custom", None)


def sampling_parameters(generation_config: Dict) -> Dict[str, float]:
    """The card's sampling defaults, overridden by those ``generation_config`` sets."""
    params = dict(CARD_SAMPLING)
    for key, name in _GENERATION_KEYS.items():
        if generation_config.get(key) is not None:
            params[name] = generation_config[key]
    return params


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('the template contains """, which a Modelfile cannot quote')
    return '"""' + text + '"""'


def modelfile_text(
    gguf_name: str, fmt: ChatFormat, eos_piece: str, sampling: Dict[str, float], context_length: int
) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` (a path relative to the Modelfile)."""
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt.go_template is not None:
        lines.append(f"TEMPLATE {_quote(fmt.go_template)}")
    else:
        lines.append(
            "# No TEMPLATE: the chat template is not one of the engine's built-in ones, so Ollama"
            " uses the GGUF's tokenizer.chat_template."
        )
    lines.append("")
    for stop in [*fmt.stops, eos_piece]:
        lines.append(f"PARAMETER stop {_quote_param(stop)}")
    for name in ("temperature", "top_p", "top_k", "repeat_penalty"):
        value = sampling[name]
        lines.append(f"PARAMETER {name} {int(value) if name == 'top_k' else value}")
    lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"


def _quote_param(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

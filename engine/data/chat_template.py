"""Chat templates: how a conversation becomes text, and which of its tokens are trained on.

One template object per model family, chosen by name in ``data.chat_template`` (and given
to ``python -m engine preprocess --chat-template``; the name is recorded in the dataset's
sidecar and checked against the config at training time). SFT data, preference data,
generation prompts and the Hugging Face export (:meth:`ChatTemplate.to_jinja`) all go
through the same object, so the format cannot drift between stages (the seed runs used a
different chat format in every stage).

A template turns ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``)
into :class:`Segment` s: pieces of text, each flagged whether it is trained on (assistant
content and its end-of-turn marker) and whether it may be cut when a record is too long
(non-assistant content only). ``eos`` segments stand for the tokenizer's EOS id, which is
not text. Segments are tokenized one by one (the engine's SentencePiece models are trained
without a dummy prefix, so this matches tokenizing the joined text up to merges across
segment borders, and it is the same for training and generation).

Templates:
  * ``chatml`` (default): ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, EOS at the
    end of the conversation; the generation prompt is ``<|im_start|>assistant\\n``.
  * ``alpaca``: a preamble (the system message, or Alpaca's standard one, which differs
    when the instruction has an input), ``### Instruction:``, optional ``### Input:``
    (the ``input`` key of a user message), ``### Response:``; EOS ends every response.
  * a path to a ``.jinja`` file: a user template rendered with ``messages`` and
    ``add_generation_prompt`` (the Hugging Face convention). Segments are found by
    rendering growing prefixes of the conversation, so the template must render a prefix
    of the conversation as a prefix of the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from engine.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """An unknown template, or messages the template cannot render."""


@dataclass
class Segment:
    """A piece of a rendered conversation."""

    text: str
    loss: bool = False
    """Trained on (assistant content, its end-of-turn marker, the EOS after it)."""
    truncatable: bool = False
    """May be shortened when the record is too long (non-assistant content)."""
    eos: bool = False
    """Stands for the tokenizer's EOS id (``text`` is empty)."""


def check_messages(messages: Sequence[Dict]) -> List[Dict]:
    """Validate roles and contents; returns the messages as plain dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} must be {{role: system|user|assistant, content: str}}, got {m!r}")
        if m["role"] == "system" and i != 0:
            raise ChatTemplateError(f"a system message must come first (message {i})")
        out.append(dict(m))
    return out


class ChatTemplate:
    """Base class: ``segments(messages, add_generation_prompt)`` is the one thing to define."""

    name = "base"

    def segments(self, messages: Sequence[Dict], add_generation_prompt: bool = False) -> List[Segment]:
        raise NotImplementedError

    def render(self, messages: Sequence[Dict], add_generation_prompt: bool = False, eos_text: str = "") -> str:
        """The conversation as text (EOS shown as ``eos_text``)."""
        return "".join(eos_text if s.eos else s.text for s in self.segments(messages, add_generation_prompt))

    def encode(self, tokenizer, messages: Sequence[Dict], add_generation_prompt: bool = False):
        """Token pieces ``[(ids, loss, truncatable)]`` of the conversation, in order."""
        pieces = []
        for seg in self.segments(messages, add_generation_prompt):
            ids = [tokenizer.eod] if seg.eos else (tokenizer.encode(seg.text) if seg.text else [])
            if ids:
                pieces.append((list(ids), seg.loss, seg.truncatable))
        return pieces

    def to_jinja(self) -> str:
        """A Hugging Face ``chat_template`` string equivalent to this template (for export)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Identifies the template in dataset sidecars (name, plus a hash of its source)."""
        return f"{self.name}:{hashlib.sha256(self.to_jinja().encode()).hexdigest()[:12]}"


class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>role\\ncontent<|im_end|>\\n``; EOS closes the conversation."""

    name = "chatml"

    def segments(self, messages: Sequence[Dict], add_generation_prompt: bool = False) -> List[Segment]:
        messages = check_messages(messages)
        segs: List[Segment] = []
        for m in messages:
            is_asst = m["role"] == "assistant"
            content = m["content"] + ("\n\n" + m["input"] if m.get("input") else "")
            segs.append(Segment(f"<|im_start|>{m['role']}\n"))
            segs.append(Segment(content, loss=is_asst, truncatable=not is_asst))
            segs.append(Segment("<|im_end|>", loss=is_asst))
            segs.append(Segment("\n"))
        if add_generation_prompt:
            segs.append(Segment("<|im_start|>assistant\n"))
        else:
            segs.append(Segment("", loss=messages[-1]["role"] == "assistant", eos=True))
        return segs

    def to_jinja(self) -> str:
        # EOS closes a conversation rendered without a generation prompt, as in segments().
        # A newline right after a block tag is written as an expression: transformers renders
        # with trim_blocks, which would drop it.
        return (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "{% if m.get('input') %}{{ '\\n\\n' + m['input'] }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}{{ eos_token }}{% endif %}"
        )


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
)


class AlpacaTemplate(ChatTemplate):
    """Stanford Alpaca's prompt, with and without ``### Input:``; EOS ends each response."""

    name = "alpaca"

    def segments(self, messages: Sequence[Dict], add_generation_prompt: bool = False) -> List[Segment]:
        messages = check_messages(messages)
        segs: List[Segment] = []
        if messages[0]["role"] == "system":
            segs.append(Segment(messages[0]["content"] + "\n\n", truncatable=True))
            messages = messages[1:]
        else:
            first_user = next((m for m in messages if m["role"] == "user"), {})
            segs.append(Segment(ALPACA_PREAMBLE_INPUT if first_user.get("input") else ALPACA_PREAMBLE))
        for m in messages:
            if m["role"] == "user":
                segs.append(Segment("### Instruction:\n"))
                segs.append(Segment(m["content"], truncatable=True))
                if m.get("input"):
                    segs.append(Segment("\n\n### Input:\n"))
                    segs.append(Segment(m["input"], truncatable=True))
                segs.append(Segment("\n\n### Response:\n"))
            elif m["role"] == "assistant":
                segs.append(Segment(m["content"], loss=True))
                segs.append(Segment("", loss=True, eos=True))
                segs.append(Segment("\n\n"))
            else:
                raise ChatTemplateError("alpaca: a system message must come first")
        if not add_generation_prompt and segs and segs[-1].text == "\n\n":
            segs.pop()  # the conversation ends with the response's EOS
        return segs

    def to_jinja(self) -> str:
        def literal(text: str) -> str:
            return "{{ '" + text.replace("\n", "\\n") + "' }}"

        # As segments(): the preamble with "Input" when the first user message has an input,
        # and no separator after the last response of a conversation that ends there. No
        # newline right after a block tag (transformers renders with trim_blocks).
        return (
            "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
            "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
            "{% elif users and users[0].get('input') %}" + literal(ALPACA_PREAMBLE_INPUT) + ""
            "{% else %}" + literal(ALPACA_PREAMBLE) + "{% endif %}"
            "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}"
            "{% if m.get('input') %}{{ '\\n\\n### Input:\\n' + m['input'] }}{% endif %}"
            "{{ '\\n\\n### Response:\\n' }}"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
            "{% if add_generation_prompt or not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        )


class JinjaTemplate(ChatTemplate):
    """A user-supplied Jinja template (Hugging Face ``chat_template`` convention)."""

    def __init__(self, source: str, name: str = "jinja"):
        import jinja2

        self.source = source
        self.name = name
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
        self._template = env.from_string(source)

    @classmethod
    def from_file(cls, path: str) -> "JinjaTemplate":
        p = Path(path)
        if not p.is_file():
            raise ChatTemplateError(f"chat template file {p} does not exist")
        return cls(p.read_text(encoding="utf-8"), name=f"jinja:{p.name}")

    def _render(self, messages, add_generation_prompt):
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, eos_token="", bos_token=""
        )

    def segments(self, messages: Sequence[Dict], add_generation_prompt: bool = False) -> List[Segment]:
        messages = check_messages(messages)
        segs: List[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            full = self._render(messages[: i + 1], False)
            if m["role"] == "assistant":
                head = self._render(messages[:i], True) if i else self._render([], True)
                if not (head.startswith(done) and full.startswith(head)):
                    raise ChatTemplateError(f"{self.name}: rendering is not prefix-stable at message {i}")
                segs.append(Segment(head[len(done) :]))
                body = full[len(head) :]
                # Whitespace after the end-of-turn marker separates turns: not trained on.
                segs.append(Segment(body.rstrip(), loss=True))
                segs.append(Segment(body[len(body.rstrip()) :]))
            else:
                if not full.startswith(done):
                    raise ChatTemplateError(f"{self.name}: rendering is not prefix-stable at message {i}")
                part = full[len(done) :]
                at = part.rfind(m["content"]) if m["content"] else -1
                if at < 0:
                    segs.append(Segment(part))
                else:  # only the content itself may be truncated, never the template's markers
                    segs += [
                        Segment(part[:at]),
                        Segment(m["content"], truncatable=True),
                        Segment(part[at + len(m["content"]) :]),
                    ]
            done = full
        if add_generation_prompt:
            segs.append(Segment(self._render(messages, True)[len(done) :]))
        else:
            segs.append(Segment("", loss=messages[-1]["role"] == "assistant", eos=True))
        return [s for s in segs if s.text or s.eos]

    def to_jinja(self) -> str:
        return self.source


BUILTIN = {"chatml": ChatMLTemplate, "alpaca": AlpacaTemplate}


def get_chat_template(spec: Optional[str]) -> ChatTemplate:
    """``chatml`` (also for None), ``alpaca``, or a path to a ``.jinja`` file."""
    spec = spec or "chatml"
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if spec.endswith(".jinja") or Path(spec).is_file():
        return JinjaTemplate.from_file(spec)
    raise ChatTemplateError(f"unknown chat template {spec!r}: use chatml, alpaca or a path to a .jinja file")


def end_of_turn_ids(template: "ChatTemplate", tok: "Tokenizer") -> List[int]:
    """Ids of the single-token end-of-turn markers of ``template`` (e.g. ChatML's
    ``<|im_end|>``): the trained text right after an assistant's content, when it is one
    token. Generation stops there as well as at EOS."""
    segs = template.segments([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])
    ids: List[int] = []
    after = False
    for s in segs:
        if after and s.loss and s.text:
            enc = tok.encode(s.text)
            if len(enc) == 1 and enc[0] != tok.eod:
                ids.append(enc[0])
            break
        after = after or (s.loss and s.text == "a")
    return ids

"""Chat templates, SFT/preference preprocessing (loss masks, truncation, drops), packing, replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.data.chat_data import RESPONSE, ChatIndexed
from engine.data.chat_template import AlpacaTemplate, ChatMLTemplate, JinjaTemplate, get_chat_template
from engine.data.packed_seq import segment_cu_seqlens
from engine.data.preprocess import preprocess
from engine.data.replay import interleave
from engine.data.sft_data import SFTDataset
from engine.data.tokenizer import load_tokenizer

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def test_chatml_render_and_generation_prompt():
    t = ChatMLTemplate()
    assert t.render(MSGS[:3], eos_text="</s>") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n</s>"
    )
    assert t.render(MSGS[:2], add_generation_prompt=True).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    trained = "".join(s.text for s in t.segments(MSGS) if s.loss)
    assert trained == "Hello!<|im_end|>See you.<|im_end|>"


def test_alpaca_with_and_without_input():
    t = AlpacaTemplate()
    plain = t.render([{"role": "user", "content": "Add 2+2"}, {"role": "assistant", "content": "4"}], eos_text="</s>")
    assert plain.startswith("Below is an instruction that describes a task. Write")
    assert plain.endswith("### Instruction:\nAdd 2+2\n\n### Response:\n4</s>")
    with_input = t.render([{"role": "user", "content": "Sum", "input": "2, 2"}, {"role": "assistant", "content": "4"}])
    assert "paired with an input" in with_input and "### Input:\n2, 2\n\n### Response:\n4" in with_input


def test_jinja_template_matches_chatml_and_export_round_trip(tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(ChatMLTemplate().to_jinja())
    j = get_chat_template(str(path))
    assert isinstance(j, JinjaTemplate)
    c = ChatMLTemplate()
    assert j.render(MSGS) == c.render(MSGS)
    assert j.render(MSGS[:2], True) == c.render(MSGS[:2], True)
    assert "".join(s.text for s in j.segments(MSGS) if s.loss) == "".join(s.text for s in c.segments(MSGS) if s.loss)


@pytest.fixture(scope="module")
def tok(post_training_data):
    return Path(post_training_data["tokenizer"])


def _write(tmp_path, name, records):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(p)


def _decode_masked(tk, toks, mask, value=1):
    return tk.decode([t for t, m in zip(toks, mask) if m == value and t != tk.eod])


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_sft_masks_both_formats_and_multi_turn(tmp_path, tok, template):
    tk = load_tokenizer(tok)
    src = _write(
        tmp_path,
        "sft.jsonl",
        [
            {"instruction": "Name a colour.", "input": "sky", "output": "Blue."},
            {"messages": MSGS},
        ],
    )
    s = preprocess([src], str(tok), str(tmp_path / "sft"), kind="sft", chat_template=template, seq_length=256)
    assert s["documents"] == 2 and s["skipped"] == {}
    data = ChatIndexed(str(tmp_path / "sft"), "sft")
    ((t0, m0),) = data.document(0)
    ((t1, m1),) = data.document(1)
    assert _decode_masked(tk, t0, m0).replace("<|im_end|>", "") == "Blue."
    assert _decode_masked(tk, t1, m1).replace("<|im_end|>", "") == "Hello!See you."
    for t, m in ((t0, m0), (t1, m1)):  # every conversation ends with a trained EOS
        assert t[-1] == tk.eod and m[-1] == 1
    if template == "chatml":
        assert tk.decode([t for t, m in zip(t1, m1) if m == 0]).count("<|im_start|>") == 5


def test_truncation_keeps_eos_and_counts_drops(tmp_path, tok):
    tk = load_tokenizer(tok)
    long_prompt = "헌법 " * 200
    src = _write(
        tmp_path,
        "sft.jsonl",
        [
            {"instruction": long_prompt, "output": "짧은 답."},
            {"instruction": "질문", "output": "긴 답 " * 300},  # the response alone cannot fit
            {"instruction": "질문", "output": "   "},  # empty response
        ],
    )
    s = preprocess([src], str(tok), str(tmp_path / "sft"), kind="sft", seq_length=64)
    assert s["documents"] == 1 and s["truncated"] == 1
    assert s["skipped"] == {"too_long": 1, "empty_response": 1}
    ((t, m),) = ChatIndexed(str(tmp_path / "sft"), "sft").document(0)
    assert len(t) == 65 and t[-1] == tk.eod and m[-1] == 1
    assert _decode_masked(tk, t, m).replace("<|im_end|>", "") == "짧은 답."
    meta = json.loads((tmp_path / "sft.json").read_text())
    assert meta["skipped"] == {"too_long": 1, "empty_response": 1} and meta["chat_template"] == "chatml"

    pref = _write(
        tmp_path,
        "pref.jsonl",
        [
            {"prompt": long_prompt, "chosen": "좋은 답.", "rejected": [{"role": "assistant", "content": "나쁜 답."}]},
            {"prompt": "질문", "chosen": "", "rejected": "답"},
            {"prompt": [{"role": "user", "content": "질문"}], "chosen": "답 " * 300, "rejected": "답"},
        ],
    )
    s = preprocess([pref], str(tok), str(tmp_path / "pref"), kind="preference", seq_length=64)
    assert s["documents"] == 1 and s["skipped"] == {"empty_response": 1, "too_long": 1}
    (c, cm), (r, rm) = ChatIndexed(str(tmp_path / "pref"), "preference").document(0)
    assert max(len(c), len(r)) == 65
    assert c[-1] == r[-1] == tk.eod and cm[-1] == rm[-1] == RESPONSE
    assert _decode_masked(tk, c, cm, RESPONSE).replace("<|im_end|>", "") == "좋은 답."
    assert _decode_masked(tk, r, rm, RESPONSE).replace("<|im_end|>", "") == "나쁜 답."
    n_prompt = int(np.argmax(cm == RESPONSE))  # tokens before the response
    assert list(c[:n_prompt]) == list(r[:n_prompt])  # same (truncated) prompt in both


def test_packing_never_crosses_a_conversation(tmp_path, tok):
    recs = [{"instruction": f"질문 {i}", "output": "답 " * (1 + i % 7)} for i in range(40)]
    preprocess([_write(tmp_path, "sft.jsonl", recs)], str(tok), str(tmp_path / "sft"), kind="sft", seq_length=96)
    data = ChatIndexed(str(tmp_path / "sft"), "sft")
    eod = load_tokenizer(tok).eod
    ds = SFTDataset(data, 0, data.num_docs, 96, 30, packing=True, seed=3, pad_id=eod)
    assert max(len(b) for b in ds.bins[:30]) > 1  # really packed
    for i in range(30):
        item = ds[i]
        labels, tokens = (item[k].numpy() for k in ("labels", "tokens"))
        convs = [data.document(ds.lo + d)[0] for d in ds.bins[i]]
        # The THD segments the model attends within are exactly the conversations (+ padding).
        cu = segment_cu_seqlens(item["position_ids"].unsqueeze(0)).tolist()
        at = 0
        for k, (toks, m) in enumerate(convs):
            n = len(toks) - 1
            assert cu[k] == at and cu[k + 1] == at + n
            # labels are this conversation's next tokens: none crosses into the next one
            assert list(labels[at : at + n]) == list(toks[1:]) and list(tokens[at : at + n]) == list(toks[:-1])
            assert list(item["loss_mask"].numpy()[at : at + n]) == list((m[1:] > 0).astype(np.float32))
            at += n
        assert cu[len(convs) :] == ([at, 96] if at < 96 else [96])
        assert item["loss_mask"].numpy()[at:].sum() == 0
    # without packing: one conversation per sample
    plain = SFTDataset(data, 0, data.num_docs, 96, 5, packing=False, seed=3, pad_id=eod)
    assert all(len(b) == 1 for b in plain.bins)


def test_replay_share_within_one_percent_and_deterministic():
    rng = np.random.default_rng(0)
    sft_tokens = rng.integers(10, 120, 10_000)
    for ratio in (0.1, 0.3, 0.5):
        src = interleave(lambda k: sft_tokens[k], 128, ratio, 600)
        for n in range(1, 601):  # every prefix of a run, not only the end
            rep = src[:n].sum() * 128
            k = int(n - src[:n].sum())
            total = rep + sft_tokens[:k].sum()
            share = rep / total
            # Off by at most one sample's tokens over the total: within 1% from ~100 samples on.
            assert abs(share - ratio) <= 128 / total, (ratio, n, share)
            if n >= 128:
                assert abs(share - ratio) < 0.01, (ratio, n, share)
        assert np.array_equal(src, interleave(lambda k: sft_tokens[k], 128, ratio, 600))
    by_samples = interleave(lambda k: sft_tokens[k], 128, 0.3, 1000, by="samples")
    assert abs(by_samples.mean() - 0.3) < 0.01

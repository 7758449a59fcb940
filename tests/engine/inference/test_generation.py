"""Generation on megatron-core models: KV-cache decode vs full recompute, greedy tokens vs
transformers' ``generate`` on the converted model, stopping, seeding, bad input, and the
same tokens at TP=2 x PP=2 under torchrun as on one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import engine.inference.decode as decode
from engine.config import ConfigError
from engine.inference import GenerationOptions, StopTokens, generate, load_generator
from models import hf_convert as hc
from tests.conftest import REPO
from tests.models.conftest import _perturb

PROMPTS = ["What does the first article say?", "Hello", "Name the rights of a citizen in three words."]


class _StubTokenizer:
    """Ids as text: enough for models built without a tokenizer."""

    eod = 0

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def varied(trained_checkpoint, tmp_path_factory):
    """The trained tiny-llama checkpoint with perturbed weights, loaded and saved as a new
    checkpoint (``varied.loaded.checkpoint``): a 3-step model repeats one token, perturbed
    weights make every position's choice depend on the cache."""
    from engine.model_io import save_model_checkpoint

    gen = load_generator(trained_checkpoint("tiny-llama"))
    _perturb(gen.loaded.model, seed=3)
    noise = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in gen.loaded.model.parameters():
            if p.dim() == 2:
                p.add_(0.3 * torch.randn(p.shape, generator=noise))
    gen.loaded.checkpoint = save_model_checkpoint(tmp_path_factory.mktemp("varied"), gen.cfg, gen.loaded.chunks)
    return gen


def _hf_model(model, model_cfg):
    config = hc.hf_config(model_cfg, attn_implementation="eager")
    hf = hc.hf_model_class(model_cfg)(config).eval()
    hf.load_state_dict(hc.megatron_to_hf(model.state_dict(), model_cfg), strict=True)
    return hf


def _hf_greedy(hf, prompt, max_new, eos_ids, repetition_penalty=1.0):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
            repetition_penalty=repetition_penalty,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate_on_the_export(varied, tmp_path):
    """Prompts of different lengths in one batch, chat template applied; transformers
    generates each prompt alone from the ``export hf`` copy of the same checkpoint, stopping
    at the EOS and end-of-turn ids the export wrote into generation_config.json."""
    from transformers import AutoModelForCausalLM

    from engine.export.hf import export_hf

    export_hf(varied.loaded.checkpoint, tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    stops = hf.generation_config.eos_token_id
    assert sorted(stops) == sorted([varied.stops.eos, *varied.stops.end_of_turn])
    ids = [varied.encode(p) for p in PROMPTS]
    assert len({len(i) for i in ids}) == 3
    ours = varied.generate(PROMPTS, GenerationOptions(max_new_tokens=24, batch_size=3))
    for prompt, result in zip(ids, ours):
        assert result.tokens == _hf_greedy(hf, prompt, 24, stops), result
    assert len({tuple(r.tokens) for r in ours}) == 3 and len(set(ours[0].tokens)) > 3  # varied output
    penalised = varied.generate(PROMPTS[:1], GenerationOptions(max_new_tokens=16, repetition_penalty=0.3))
    assert penalised[0].tokens == _hf_greedy(hf, ids[0], 16, stops, repetition_penalty=0.3)
    assert penalised[0].tokens != ours[0].tokens[:16]


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.preset=tiny-gpt2", "model.vocab_size=200"),
        ("model.preset=tiny-moe", "model.sliding_window=0"),
    ],
    ids=["gpt2", "mixtral"],
)
def test_greedy_equals_transformers_other_architectures(build_megatron, overrides):
    cfg, model = build_megatron(overrides)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (9, 5)]
    tok = _StubTokenizer(cfg.model.vocab_size)
    ours = generate(
        [model], tok, prompts, GenerationOptions(max_new_tokens=12, batch_size=2), vocab_size=cfg.model.vocab_size
    )
    hf = _hf_model(model, cfg.model)
    for prompt, result in zip(prompts, ours):
        assert result.tokens == _hf_greedy(hf, prompt, 12, [tok.eod]), result


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.preset=tiny-llama", "model.vocab_size=250"),
        ("model.preset=tiny-gpt2", "model.vocab_size=200"),
        ("model.preset=tiny-moe", "model.sliding_window=6"),
    ],
    ids=["llama", "gpt2", "mixtral-window6"],
)
def test_kv_cache_decode_equals_full_recompute(build_megatron, overrides, monkeypatch):
    """The logits every decode step sees (KV cache, one position per step) equal the logits
    of one forward pass over the finished sequence; a sliding window (6) shorter than the
    sequences is crossed."""
    cfg, model = build_megatron(overrides)
    seen = []
    real = decode.next_tokens

    def record(logits, tokens, options, generators):
        seen.append(logits.clone())
        return real(logits, tokens, options, generators)

    monkeypatch.setattr(decode, "next_tokens", record)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, cfg.model.vocab_size, (n,), generator=gen).tolist() for n in (7, 4)]
    opts = GenerationOptions(greedy=False, max_new_tokens=10, batch_size=2, seed=5)
    results = generate([model], _StubTokenizer(cfg.model.vocab_size), prompts, opts, vocab_size=cfg.model.vocab_size)
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        seq = torch.tensor([prompt + result.tokens])
        with torch.no_grad():
            full = model(seq, torch.arange(seq.size(1)).unsqueeze(0), None)[0, :, : cfg.model.vocab_size]
        # Step logits of this row: row 1 (shorter prompt) starts first; rows drop out when done.
        steps = _row_steps(seen, prompts, results, row)
        want = full[len(prompt) - 1 : len(prompt) - 1 + len(result.tokens)]
        torch.testing.assert_close(torch.stack(steps), want, rtol=0, atol=1e-4)


def _row_steps(seen, prompts, results, row):
    """The logits rows the decode loop passed to ``next_tokens`` for prompt ``row``."""
    lengths = [len(p) for p in prompts]
    out, end = [], min(lengths)
    for logits in seen:
        active = [i for i in range(len(prompts)) if lengths[i] <= end and end - lengths[i] < len(results[i].tokens)]
        if row in active:
            out.append(logits[active.index(row)])
        end += 1
    return out


def test_seeded_sampling_reproducible(varied):
    opts = GenerationOptions(
        greedy=False, temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=12, seed=11, batch_size=3
    )
    a = varied.generate(PROMPTS, opts)
    b = varied.generate(PROMPTS[1:], GenerationOptions(**{**vars(opts), "seed": 12, "batch_size": 1}))
    assert [r.tokens for r in a[1:]] == [r.tokens for r in b]  # seed + index, whatever the batch
    c = varied.generate(PROMPTS, GenerationOptions(**{**vars(opts), "seed": 99}))
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_stops_at_eos_end_of_turn_and_stop_ids(varied):
    assert varied.stops.end_of_turn == (varied.tokenizer.token_to_id("<|im_end|>"),)
    chunks, tok = varied.loaded.chunks, varied.tokenizer
    ids = [varied.encode(PROMPTS[0])]
    free = generate(chunks, tok, ids, GenerationOptions(max_new_tokens=10))[0]
    assert free.finished_by == "length" and len(free.tokens) == 10
    k = next(i for i, t in enumerate(free.tokens) if t not in free.tokens[:i])  # first occurrence
    if k == 0:
        k = next(i for i, t in enumerate(free.tokens) if i > 0 and t not in free.tokens[:i])
    stop = free.tokens[k]
    for stops, reason in (
        (StopTokens(eos=stop), "eos"),
        (StopTokens(eos=tok.eod, end_of_turn=[stop]), "end_of_turn"),
        (StopTokens(eos=tok.eod, extra=[stop]), "stop"),
    ):
        r = generate(chunks, tok, ids, GenerationOptions(max_new_tokens=10), stops=stops)[0]
        assert (r.finished_by, r.tokens) == (reason, free.tokens[: k + 1])
        assert r.text == tok.decode(free.tokens[:k])
    streamed = []
    r = generate(
        chunks, tok, ids, GenerationOptions(max_new_tokens=10, stop_ids=[stop]), stream=lambda i, t: streamed.append(t)
    )[0]
    assert r.finished_by == "stop" and "".join(streamed) == r.text


def test_bad_input_is_one_line(varied, tmp_path):
    chunks, tok = varied.loaded.chunks, varied.tokenizer
    too_long = [1] * varied.cfg.model.max_seq_length
    for prompts, words in (([[]], "prompt 0 is empty"), ([[5, 6], too_long], "prompt 1 has"), ([], "no prompts")):
        with pytest.raises(ConfigError, match=words) as err:
            generate(chunks, tok, prompts, GenerationOptions())
        assert "\n" not in str(err.value)
    # A checkpoint whose tokenizer is gone: refused before the model is built.
    ckpt = varied.loaded.checkpoint
    copy = tmp_path / "ckpt"
    copy.symlink_to(ckpt, target_is_directory=True) if False else None
    import shutil

    shutil.copytree(ckpt, copy)
    text = (copy / "config.yaml").read_text().replace(str(varied.cfg.data.tokenizer), str(tmp_path / "gone"))
    (copy / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="tokenizer") as err:
        load_generator(copy)
    assert "\n" not in str(err.value)


def _generate_on_ranks(rank, ckpt, tensor, pipeline, options):
    from engine.config import ParallelConfig

    gen = load_generator(ckpt, parallel=ParallelConfig(tensor=tensor, pipeline=pipeline))
    return [r.tokens for r in gen.generate(PROMPTS, GenerationOptions(**options))]


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_tp2_and_pp2_same_tokens_as_one_process(varied, run_distributed, layout):
    """Loaded at TP=2 or PP=2 on two gloo ranks (dist_checkpointing reshards), the checkpoint
    generates exactly the tokens one process does: greedy, and sampled with the same seed."""
    ckpt = str(varied.loaded.checkpoint)
    for options in (
        {"max_new_tokens": 12, "batch_size": 3},
        {"greedy": False, "top_k": 100, "seed": 8, "max_new_tokens": 8},
    ):
        one = [r.tokens for r in varied.generate(PROMPTS, GenerationOptions(**options))]
        tensor, pipeline = layout
        ranks = run_distributed(
            _generate_on_ranks, 2, ckpt, tensor, pipeline, options, tensor=tensor, pipeline=pipeline
        )
        assert ranks == [one, one]


@pytest.mark.slow
def test_tp2_pp2_under_torchrun_same_tokens(trained_checkpoint, tmp_path):
    """The checkpoint trained at TP=2 x PP=2 generates under torchrun (4 processes, its own
    layout) exactly the tokens one process generates from it, greedy and sampled."""
    ckpt = trained_checkpoint("tiny-llama", 4, tensor=2, pipeline=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["--prompts", str(prompts), "--max-new-tokens", "10", "--batch-size", "3", "--quiet"]
    sampled = ["--temperature", "1.0", "--top-k", "200", "--seed", "3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = tmp_path / "tp2pp2.jsonl"
    cmd = [*launcher, "-m", "engine", "generate", str(ckpt), *args, *sampled, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]

    gen = load_generator(ckpt)  # one process: TP=PP=1, resharded by dist_checkpointing
    one = gen.generate(PROMPTS, GenerationOptions(greedy=False, temperature=1.0, top_k=200, seed=3, max_new_tokens=10))
    assert parallel == [r.tokens for r in one]
    assert len({t for r in one for t in r.tokens}) > 10  # sampled, varied tokens


def test_generation_layout():
    """One process: TP=PP=1 (None); under torchrun: the checkpoint's TP x PP, all ranks used,
    without the training-only parts; any other world size is one line."""
    from engine.config import ParallelConfig
    from engine.inference.loading import generation_layout

    saved = ParallelConfig(tensor=2, pipeline=2, virtual_pipeline=2, expert=2, distributed_optimizer=True)
    assert generation_layout(saved, 1) is None
    layout = generation_layout(saved, 4)
    assert layout is not None
    assert (layout.tensor, layout.pipeline, layout.virtual_pipeline, layout.expert) == (2, 2, None, 1)
    assert not layout.distributed_optimizer
    with pytest.raises(ConfigError, match="tensor x pipeline = 2 x 2 = 4 processes .* not 2"):
        generation_layout(saved, 2)

"""Packed SFT micro-batches (THD ``PackedSeqParams``) equal each conversation run alone.

The oracle is the same megatron-core model on every segment separately (batch 1, positions
0..L-1, plain causal attention): packing must change nothing a conversation sees. A
control runs the packed rows without the THD parameters (plain causal attention over the
row) and must differ, so the comparison can detect attention or RoPE crossing a boundary.
"""

from __future__ import annotations

import pytest
import torch

from engine.data.packed_seq import segment_cu_seqlens, thd_micro_batch

TOL = 1e-5
SEQ = 48
# Per row: conversation lengths (positions); the rest of the row is padding, its own segment.
ROWS = [[13, 21, 1], [48], [30, 17]]

LLAMA = ("model.preset=tiny-llama", "model.num_attention_heads=8")  # GQA 8:2, RoPE
GPT2 = ("model.preset=tiny-gpt2",)  # learned absolute positions
MOE_WINDOW_ALL = ("model.preset=tiny-moe", "model.sliding_window_layers=all")  # window 16 < 21


def _packed_batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (len(ROWS), SEQ), generator=gen)
    labels = torch.randint(0, vocab, (len(ROWS), SEQ), generator=gen)
    pos = torch.zeros(len(ROWS), SEQ, dtype=torch.long)
    segments = []  # (row, start, length), padding included
    for r, lengths in enumerate(ROWS):
        at = 0
        for n in lengths + ([SEQ - sum(lengths)] if sum(lengths) < SEQ else []):
            pos[r, at : at + n] = torch.arange(n)
            segments.append((r, at, n))
            at += n
    return {"tokens": tokens, "labels": labels, "position_ids": pos}, segments


def test_cu_seqlens_from_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [7, 8, 0, 0, 0, 1]])
    assert segment_cu_seqlens(pos).tolist() == [0, 3, 5, 6, 12, 14, 15, 16, 18]
    assert segment_cu_seqlens(pos).dtype == torch.int32


@pytest.mark.parametrize("overrides", [LLAMA, GPT2, MOE_WINDOW_ALL], ids=["llama-gqa8x2", "gpt2", "mixtral-window"])
def test_packed_equals_each_conversation_alone(build_megatron, overrides):
    cfg, model = build_megatron(overrides)
    batch, segments = _packed_batch(cfg.model.vocab_size)
    tokens, labels, pos, params = thd_micro_batch(batch)
    assert params.cu_seqlens_q.tolist() == [0] + [r * SEQ + a + n for r, a, n in segments]
    assert params.max_seqlen_q == SEQ
    with torch.no_grad():
        packed = model(tokens, pos, None, labels=labels, packed_seq_params=params).reshape(len(ROWS), SEQ)
        alone = torch.zeros_like(packed)
        for r, a, n in segments:
            alone[r, a : a + n] = model(
                batch["tokens"][r : r + 1, a : a + n],
                torch.arange(n).unsqueeze(0),
                None,
                labels=batch["labels"][r : r + 1, a : a + n],
            )[0]
        crossing = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    diff = (packed - alone).abs().max().item()
    assert diff <= TOL, f"packed vs alone: max per-token loss difference {diff:.3e}"
    # Control: without THD the later conversations of a row see the earlier ones.
    assert (crossing - alone).abs().max().item() > 100 * TOL


def test_sft_objective_trains_packed_rows_per_conversation(build_megatron):
    """The SFT objective's forward step (the loop's entry point) really goes through THD:
    its loss equals the sum over conversations run alone, and differs without packing."""
    import dataclasses

    from engine.objectives.sft import SFTObjective

    cfg, model = build_megatron(LLAMA)
    batch, segments = _packed_batch(cfg.model.vocab_size)
    loss_mask = torch.zeros(len(ROWS), SEQ)
    for r, lengths in enumerate(ROWS):
        loss_mask[r, : sum(lengths)] = 1.0  # padding carries no loss
    batch.update(loss_mask=loss_mask, dataset_id=torch.zeros(len(ROWS), dtype=torch.long))
    with torch.no_grad():
        alone = sum(
            (
                model(
                    batch["tokens"][r : r + 1, a : a + n],
                    torch.arange(n).unsqueeze(0),
                    None,
                    labels=batch["labels"][r : r + 1, a : a + n],
                )[0]
                * loss_mask[r, a : a + n]
            ).sum()
            for r, a, n in segments
        )

        def loss_of(objective):
            output, loss_func = objective.forward_step(iter([batch]), model)
            loss_sum, tokens, metrics = loss_func(output)
            assert int(tokens) == int(loss_mask.sum()) and metrics["tokens_ds0"] == loss_mask.sum()
            return loss_sum.item()

        packed = loss_of(SFTObjective(cfg))
        unpacked = loss_of(SFTObjective(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))))
    assert SFTObjective(cfg).activation_shape(SEQ, len(ROWS)) == (SEQ * len(ROWS), 1)
    assert abs(packed - alone.item()) <= TOL * abs(alone.item()), (packed, alone.item())
    assert abs(unpacked - alone.item()) > 100 * TOL * abs(alone.item())

"""Parity of models/hf_convert.py: megatron-core GPTModel vs transformers, logit for logit.

Every parity check is paired with a deliberately wrong mapping that must fail it, so the
1e-4 tolerance is shown to detect the bug the seed run shipped (an unsplit fused QKV).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import hf_convert as hc

TOL = 1e-4
BATCH, SEQ = 2, 32

# Vocab sizes off the padding multiple (128) so the strip/re-pad of padding rows is exercised.
LLAMA = ("model.preset=tiny-llama", "model.num_attention_heads=8", "model.vocab_size=250")  # GQA 8:2
LLAMA_UNTIED = ("model.preset=tiny-llama", "model.tie_embeddings=false", "model.vocab_size=200")
GPT2 = ("model.preset=tiny-gpt2", "model.vocab_size=200")
MOE = ("model.preset=tiny-moe", "model.sliding_window=0")
MOE_WINDOW_ALL = ("model.preset=tiny-moe", "model.sliding_window_layers=all")  # window 16 < SEQ


def _tokens(cfg):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ), generator=gen)


def _megatron_logits(model, cfg) -> torch.Tensor:
    tokens = _tokens(cfg)
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    # Padded vocabulary columns have no HF counterpart.
    return logits[..., : cfg.model.vocab_size].float()


def _hf_logits(hf_sd, cfg, **config_kwargs) -> torch.Tensor:
    config = hc.hf_config(cfg.model, attn_implementation="eager", **config_kwargs)
    model = hc.hf_model_class(cfg.model)(config).eval()
    model.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        return model(input_ids=_tokens(cfg)).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape == (BATCH, SEQ, a.shape[-1])
    return (a - b).abs().max().item()


def _params(sd):
    return {k: v for k, v in sd.items() if not k.endswith("._extra_state")}


# ------------------------------------------------------------------------------------
# Logit parity
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [LLAMA, LLAMA_UNTIED, GPT2, MOE, MOE_WINDOW_ALL],
    ids=["llama-gqa8x2", "llama-untied", "gpt2", "mixtral", "mixtral-window-all"],
)
def test_logits_match_transformers(build_megatron, overrides, record_property):
    cfg, model = build_megatron(overrides)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg.model)
    diff = _max_diff(_megatron_logits(model, cfg), _hf_logits(hf_sd, cfg))
    record_property("max_abs_diff", diff)
    print(f"{'/'.join(overrides)}: max |megatron - hf| = {diff:.3e}")
    assert diff <= TOL, f"max abs logit difference {diff:.3e} > {TOL}"


def _swap_kv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """Swap each group's key and value heads inside megatron's fused QKV."""
    per = heads // groups
    t = qkv.reshape(groups, per + 2, head_dim, *qkv.shape[1:]).clone()
    t[:, [per, per + 1]] = t[:, [per + 1, per]]
    return t.reshape(qkv.shape)


@pytest.mark.parametrize("overrides", [LLAMA, GPT2], ids=["llama-gqa8x2", "gpt2"])
def test_wrong_qkv_mapping_fails_the_tolerance(build_megatron, overrides):
    cfg, model = build_megatron(overrides)
    heads, groups, head_dim = hc._heads(cfg.model)
    ref = _megatron_logits(model, cfg)

    # 1. Keys and values exchanged within the fused QKV.
    sd = dict(model.state_dict())
    for k in [k for k in sd if k.endswith("linear_qkv.weight")]:
        sd[k] = _swap_kv(sd[k], heads, groups, head_dim)
    swapped = _max_diff(ref, _hf_logits(hc.megatron_to_hf(sd, cfg.model), cfg))
    assert swapped > 100 * TOL, f"k/v swap changed logits by only {swapped:.3e}"

    # 2. The naive split that ignores megatron's per-group interleaving (q|k|v contiguous).
    naive = hc.megatron_to_hf(model.state_dict(), cfg.model)
    q_rows, kv_rows = heads * head_dim, groups * head_dim
    for i in range(cfg.model.num_layers):
        qkv = model.state_dict()[f"decoder.layers.{i}.self_attention.linear_qkv.weight"]
        if cfg.model.position_embedding == "learned_absolute":  # GPT-2 Conv1D: [in, out]
            naive[f"transformer.h.{i}.attn.c_attn.weight"] = qkv.t().contiguous()
        else:
            q, k, v = torch.split(qkv, [q_rows, kv_rows, kv_rows], dim=0)
            for name, t in zip("qkv", (q, k, v)):
                naive[f"model.layers.{i}.self_attn.{name}_proj.weight"] = t.clone()
    wrong = _max_diff(ref, _hf_logits(naive, cfg))
    assert wrong > 100 * TOL, f"naive QKV split changed logits by only {wrong:.3e}"


def test_sliding_window_is_applied_on_both_sides(build_megatron):
    """Exporting a windowed model as full attention must visibly change the logits,
    otherwise the windowed parity case above would prove nothing about the window."""
    cfg, model = build_megatron(MOE_WINDOW_ALL)
    assert hc.hf_config(cfg.model).sliding_window == cfg.model.sliding_window
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg.model)
    full = _hf_logits(hf_sd, cfg, sliding_window=None)
    assert _max_diff(_megatron_logits(model, cfg), full) > 100 * TOL


# ------------------------------------------------------------------------------------
# Round trip and strictness
# ------------------------------------------------------------------------------------


def _zero_padding(sd, cfg):
    """Megatron's padding rows are randomly initialised; HF drops them and the import pads
    with zeros, so exact round trips hold for zero padding only."""
    sd = dict(_params(sd))
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if k in sd:
            sd[k] = sd[k].clone()
            sd[k][cfg.model.vocab_size :] = 0
    return sd


@pytest.mark.parametrize(
    "overrides", [LLAMA, LLAMA_UNTIED, GPT2, MOE], ids=["llama-gqa8x2", "llama-untied", "gpt2", "mixtral"]
)
def test_round_trip_is_exact(build_megatron, overrides):
    cfg, model = build_megatron(overrides)
    original = _zero_padding(model.state_dict(), cfg)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg.model)
    assert hf_sd["lm_head.weight"].shape[0] == cfg.model.vocab_size
    if overrides is not MOE:  # these variants have padding rows to strip and re-add
        assert original["embedding.word_embeddings.weight"].shape[0] > cfg.model.vocab_size
    back = hc.hf_to_megatron(hf_sd, cfg.model)
    assert set(back) == set(original)
    assert set(back) == {n for n, _ in model.named_parameters()}
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("overrides", [LLAMA, MOE], ids=["llama-gqa8x2", "mixtral"])
def test_save_pretrained_files_import_back(build_megatron, overrides, tmp_path):
    """The files transformers writes differ from its in-memory state dict (tied lm_head
    dropped; Mixtral experts un-fused to block_sparse_moe.experts.<e>.w1/w2/w3): both import."""
    from safetensors.torch import load_file

    cfg, model = build_megatron(overrides)
    hf_model = hc.hf_model_class(cfg.model)(hc.hf_config(cfg.model))
    hf_model.load_state_dict(hc.megatron_to_hf(model.state_dict(), cfg.model), strict=True)
    hf_model.save_pretrained(tmp_path)
    back = hc.hf_to_megatron(load_file(tmp_path / "model.safetensors"), cfg.model)
    original = _zero_padding(model.state_dict(), cfg)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_round_trip_loads_into_megatron(build_megatron):
    cfg, model = build_megatron(LLAMA)
    back = hc.hf_to_megatron(hc.megatron_to_hf(model.state_dict(), cfg.model), cfg.model)
    fresh_cfg, fresh = build_megatron(LLAMA + ("training.seed=7",))  # other random weights
    assert _max_diff(_megatron_logits(model, cfg), _megatron_logits(fresh, fresh_cfg)) > 100 * TOL
    hc.load_megatron_state_dict(fresh, back)
    assert _max_diff(_megatron_logits(model, cfg), _megatron_logits(fresh, fresh_cfg)) == 0.0


def test_megatron_missing_or_extra_key_raises(build_megatron):
    cfg, model = build_megatron(LLAMA)
    sd = dict(model.state_dict())
    missing = dict(sd)
    del missing["decoder.layers.1.self_attention.linear_qkv.weight"]
    with pytest.raises(
        hc.ConversionError, match=r"missing 1 keys: decoder\.layers\.1\.self_attention\.linear_qkv\.weight"
    ):
        hc.megatron_to_hf(missing, cfg.model)
    extra = dict(sd, **{"decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(16)})
    with pytest.raises(hc.ConversionError, match=r"unexpected 1 keys: .*q_layernorm"):
        hc.megatron_to_hf(extra, cfg.model)
    # A layer beyond num_layers (e.g. a config that disagrees with the checkpoint).
    cfg_short = dataclasses.replace(cfg.model, num_layers=cfg.model.num_layers - 1)
    with pytest.raises(hc.ConversionError, match=r"unexpected .*decoder\.layers\.3\."):
        hc.megatron_to_hf(sd, cfg_short)
    wrong_shape = dict(sd, **{"decoder.final_layernorm.weight": torch.ones(3)})
    with pytest.raises(hc.ConversionError, match="wrong shapes"):
        hc.megatron_to_hf(wrong_shape, cfg.model)


def test_hf_missing_or_extra_key_raises(build_megatron):
    cfg, model = build_megatron(LLAMA)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg.model)
    missing = dict(hf_sd)
    del missing["model.layers.2.self_attn.v_proj.weight"]
    with pytest.raises(hc.ConversionError, match=r"missing 1 keys: model\.layers\.2\.self_attn\.v_proj\.weight"):
        hc.hf_to_megatron(missing, cfg.model)
    extra = dict(hf_sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    with pytest.raises(hc.ConversionError, match="unexpected 1 keys"):
        hc.hf_to_megatron(extra, cfg.model)
    # Tied head: absent (as save_pretrained writes it) is fine; different from the embedding is not.
    no_head = {k: v for k, v in hf_sd.items() if k != "lm_head.weight"}
    assert set(hc.hf_to_megatron(no_head, cfg.model)) == set(_params(model.state_dict()))
    bad_head = dict(hf_sd, **{"lm_head.weight": hf_sd["lm_head.weight"] + 1})
    with pytest.raises(hc.ConversionError, match="lm_head.weight differs"):
        hc.hf_to_megatron(bad_head, cfg.model)


def _to_te_names(sd, cfg, grouped: bool = False):
    """Rewrite a local-spec state dict with the TransformerEngine spec's parameter names."""
    out = {}
    for k, v in sd.items():
        k = k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
        if not cfg.model.num_experts:
            k = k.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
        if grouped and ".local_experts." in k and not k.endswith("_extra_state"):
            head, rest = k.split(".local_experts.")
            expert, layer, kind = rest.split(".")
            k = f"{head}.{layer}.{kind}{expert}"
        out[k] = v
    out["decoder.layers.0.self_attention.core_attention._extra_state"] = torch.zeros(4)  # TE FP8 meta
    return out


@pytest.mark.parametrize(
    "overrides,grouped", [(LLAMA, False), (GPT2, False), (MOE, True)], ids=["llama", "gpt2", "mixtral-grouped"]
)
def test_transformer_engine_names_are_accepted(build_megatron, overrides, grouped):
    cfg, model = build_megatron(overrides)
    sd = model.state_dict()
    te = _to_te_names(sd, cfg, grouped)
    assert any("layer_norm_weight" in k for k in te)
    ref, got = hc.megatron_to_hf(sd, cfg.model), hc.megatron_to_hf(te, cfg.model)
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    # Both a fused TE norm and a separate norm for the same layer is ambiguous.
    both = dict(te, **{"decoder.layers.0.input_layernorm.weight": sd["decoder.layers.0.input_layernorm.weight"]})
    with pytest.raises(hc.ConversionError, match="both map to"):
        hc.megatron_to_hf(both, cfg.model)


def test_legacy_mixtral_expert_layout_is_accepted(build_megatron):
    cfg, model = build_megatron(MOE)
    hf_sd = hc.megatron_to_hf(model.state_dict(), cfg.model)
    legacy, ffn = {}, cfg.model.moe_ffn_hidden_size
    for k, v in hf_sd.items():
        layer = k.split(".mlp.")[0]
        if k.endswith("mlp.gate.weight"):
            legacy[f"{layer}.block_sparse_moe.gate.weight"] = v
        elif k.endswith("mlp.experts.gate_up_proj"):
            for e in range(v.shape[0]):
                legacy[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = v[e, :ffn]
                legacy[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = v[e, ffn:]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                legacy[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = v[e]
        else:
            legacy[k] = v
    a, b = hc.hf_to_megatron(hf_sd, cfg.model), hc.hf_to_megatron(legacy, cfg.model)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------
# Architectures HF cannot express
# ------------------------------------------------------------------------------------


def _model_cfg(*overrides):
    from engine.run_config import load_run_config

    return load_run_config(None, list(overrides)).model


def test_per_layer_sliding_window_needs_explicit_permission():
    moe = _model_cfg("model.preset=tiny-moe")  # window on even layers only
    with pytest.raises(hc.ConversionError, match="sliding-window"):
        hc.hf_config(moe)
    assert hc.hf_config(moe, allow_sliding_window_mismatch=True).sliding_window is None
    llama = _model_cfg("model.preset=tiny-llama", "model.sliding_window=8")
    with pytest.raises(hc.ConversionError, match="llama cannot express"):
        hc.hf_config(llama)


def test_unmappable_architectures_raise():
    with pytest.raises(hc.ConversionError, match="no Hugging Face family"):
        hc.hf_family(_model_cfg("model.preset=tiny-llama", "model.normalization=LayerNorm"))
    with pytest.raises(hc.ConversionError, match="GPT-2 has no GQA"):
        hc.hf_family(_model_cfg("model.preset=tiny-gpt2", "model.num_query_groups=2"))
    with pytest.raises(hc.ConversionError, match="Mixtral"):
        hc.hf_family(_model_cfg("model.preset=tiny-moe", "model.add_bias=true"))


def test_nonzero_expert_bias_is_refused(build_megatron):
    cfg, model = build_megatron(MOE)
    sd = dict(model.state_dict())
    zero = dict(sd, **{"decoder.layers.0.mlp.router.expert_bias": torch.zeros(cfg.model.num_experts)})
    hc.megatron_to_hf(zero, cfg.model)  # no effect on routing: dropped
    nonzero = dict(sd, **{"decoder.layers.0.mlp.router.expert_bias": torch.ones(cfg.model.num_experts)})
    with pytest.raises(hc.ConversionError, match="expert bias"):
        hc.megatron_to_hf(nonzero, cfg.model)

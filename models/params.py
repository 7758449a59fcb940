"""Parameter counts of a model, from its config: the one place they are computed.

Exactly as megatron-core's GPTModel lays the parameters out (TP=PP=1): per layer two norms
(``h``, ``2h`` with LayerNorm biases), QKV ``(q + 2 kv) h``, output projection ``q h``, MLP
``(2f if SwiGLU else f) h + f h`` (+ biases); MoE layers a router ``E h`` and ``E`` expert
MLPs of width ``f_e``. Plus the word embedding ``V_pad h``, learned positions ``S_max h``,
the final norm and, untied, the output layer. ``parallel.plan`` splits these per GPU;
``models.build.count_parameters`` checks them against a built model.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig


@dataclass
class ParameterCounts:
    """Whole-model parameter counts, by where they live."""

    total: int
    active: int
    embedding: int  # word embedding (+ untied output layer, + learned positions)
    per_layer_dense: int  # attention + norms (+ dense MLP) of one layer
    per_layer_expert: int  # all experts of one MoE layer (0 for dense models)
    per_layer_router: int
    final_norm: int


def norm_params(m: ModelConfig) -> int:
    """Parameters of one normalisation layer."""
    return m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)


def mlp_params(m: ModelConfig, width: int) -> int:
    """Parameters of one MLP of ``width`` (gated with SwiGLU; biases with ``add_bias``)."""
    h, gated = m.hidden_size, m.activation == "swiglu"
    fc1 = (2 * width if gated else width) * h + ((2 * width if gated else width) if m.add_bias else 0)
    fc2 = width * h + (h if m.add_bias else 0)
    return fc1 + fc2


def attention_dims(m: ModelConfig):
    """(query width, key/value width) of one layer: heads x head_dim, groups x head_dim."""
    return m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim


def active_parameters(m: ModelConfig, total: int, experts: int) -> int:
    """Parameters one token passes through: MoE layers use ``moe_router_topk`` of
    ``num_experts`` experts (``experts`` = parameters of all experts of all layers)."""
    if not m.num_experts:
        return total
    return total - experts + experts * m.moe_router_topk // m.num_experts


def parameter_counts(m: ModelConfig) -> ParameterCounts:
    """Parameters of ``m`` exactly as megatron-core's GPTModel builds them (TP=PP=1)."""
    h = m.hidden_size
    q, kv = attention_dims(m)
    qkv = (q + 2 * kv) * h + ((q + 2 * kv) if m.add_bias else 0)
    proj = q * h + (h if m.add_bias else 0)
    dense = 2 * norm_params(m) + qkv + proj
    expert = router = 0
    if m.num_experts:
        expert = m.num_experts * mlp_params(m, m.expert_ffn_hidden_size)
        router = m.num_experts * h
    else:
        dense += mlp_params(m, m.ffn_hidden_size)
    vocab = m.padded_vocab_size
    embedding = vocab * h + (m.max_seq_length * h if m.position_embedding == "learned_absolute" else 0)
    if not m.tie_embeddings:
        embedding += vocab * h
    final = norm_params(m)
    total = m.num_layers * (dense + expert + router) + embedding + final
    active = active_parameters(m, total, m.num_layers * expert)
    return ParameterCounts(total, active, embedding, dense, expert, router, final)

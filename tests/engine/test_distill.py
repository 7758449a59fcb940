"""Knowledge distillation (objective ``distill``, through nvidia-modelopt).

In-process, against torch's own KL divergence and cross entropy on the two models' logits
(float64): the logged KD loss is KL(teacher || student) at the temperature, masked and summed
over tokens; identical teacher and student give 0; the teacher gets no gradient and is not in
the student's sharded state. One CLI run distils the trained tiny-llama into a narrower,
shallower student: the KD loss falls, KD and LM losses are logged separately, and the
checkpoint holds exactly the student's tensors. Bad teachers are one-line config errors.
TP=2 / PP=2 equivalence and resume: tests/parallel/test_distill_equivalence.py (slow).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.run_config import load_run_config
from tests.conftest import post_training_config, run_engine, step_metrics

SEQ, BATCH, VOCAB = 32, 2, 1024


def _cfg(teacher, *overrides):
    return load_run_config(
        None,
        [
            "model.preset=tiny-llama",
            f"model.vocab_size={VOCAB}",
            "data.paths=[unused]",
            f"data.seq_length={SEQ}",
            "precision.dtype=fp32",
            "objective.name=distill",
            f"objective.distill.teacher={teacher}",
            *overrides,
        ],
    )


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 1000, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[0, :5] = 0  # masked tokens must not count
    loss_mask[1, -3:] = 0
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def _oracle(student_logits, teacher_logits, labels, mask, temperature):
    """Per-token means of KL(teacher || student) at the temperature and of the student's CE."""
    s, t, m = student_logits.double(), teacher_logits.double(), mask.double()
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), reduction="none").reshape(labels.shape)
    return float((kl * m).sum() / m.sum()), float((ce * m).sum() / m.sum())


def _distil_one_batch(teacher_dir, student_weights, *overrides):
    """One forward/backward of the distill objective on a fixed batch; returns the finalized
    metrics, the oracle's numbers and the distillation model."""
    from engine.model_io import load_model
    from engine.objectives.distill import DistillObjective
    from models.build import build_gpt_chunks

    cfg = _cfg(teacher_dir, *overrides)
    teacher = load_model(teacher_dir).model  # the reference logits, from the engine's own loader
    objective = DistillObjective(cfg)
    (student,) = build_gpt_chunks(cfg, torch.float32).chunks
    if student_weights is not None:
        student.load_state_dict(student_weights)
    batch = _batch()
    with torch.no_grad():
        args = (batch["tokens"], batch["position_ids"], None)
        expected = _oracle(
            student(*args),
            teacher(*args),
            batch["labels"],
            batch["loss_mask"],
            cfg.objective.distill.logit_kl_temperature,
        )
    (model,) = objective.wrap_model([student])
    model.train()
    output, loss_func = objective.forward_step(iter([batch]), model)
    loss, tokens, metrics = loss_func(output)
    loss.backward()
    sums = {k: float(v) for k, v in metrics.items()}
    return objective.finalize_metrics(sums), expected, model, int(tokens)


@pytest.mark.parametrize("skip_lm_loss", [True, False], ids=["kd_only", "kd_and_lm"])
def test_kd_loss_is_torch_kl_of_teacher_and_student_logits(megatron_single_rank, trained_checkpoint, skip_lm_loss):
    """A random student against the trained teacher at temperature 2. With the LM loss kept,
    megatron-core's cross entropy runs on the same fp32 logits first (in place): the KD loss
    must still be the KL of the true logits. The teacher gets no gradient, the student does,
    and the teacher is in no state dict the checkpoint is written from."""
    teacher_dir = trained_checkpoint("tiny-llama")
    got, (kl, ce), model, tokens = _distil_one_batch(
        teacher_dir,
        None,
        "objective.distill.logit_kl_temperature=2.0",
        f"objective.distill.skip_lm_loss={str(skip_lm_loss).lower()}",
    )
    assert tokens == BATCH * SEQ - 8
    assert kl > 1e-3, kl  # the two models really differ
    # fp32 KL of two nearby distributions over 1024 entries: ~1e-5 of its value in rounding.
    assert got["kd_loss"] == pytest.approx(kl, rel=1e-4)
    assert got["lm_loss"] == pytest.approx(ce, rel=1e-5)
    # modelopt's balancer: the KD loss alone, or LM + KD rescaled to the LM loss (kd_loss_scale 1).
    assert got["loss"] == pytest.approx(kl if skip_lm_loss else 2 * ce, rel=1e-4)
    teacher_params = list(model.teacher_model.parameters())
    assert teacher_params and all(p.grad is None and not p.requires_grad for p in teacher_params)
    student_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("_teacher_model")]
    assert student_grads and all(g is not None for g in student_grads)
    assert any(float(g.abs().sum()) > 0 for g in student_grads)
    plain = set(type(model.teacher_model).sharded_state_dict(model.teacher_model))
    assert set(model.sharded_state_dict()) == plain  # the student's keys, no teacher's
    assert not any("teacher" in k for k in model.state_dict())


def test_identical_teacher_and_student_give_kl_zero(megatron_single_rank, trained_checkpoint):
    from engine.model_io import load_model

    teacher_dir = trained_checkpoint("tiny-llama")
    weights = load_model(teacher_dir).model.state_dict()
    got, (kl, ce), _, _ = _distil_one_batch(teacher_dir, weights, "objective.distill.logit_kl_temperature=3.0")
    assert kl == 0.0 and got["kd_loss"] == 0.0 and got["loss"] == 0.0
    assert got["lm_loss"] == pytest.approx(ce, rel=1e-5)


def test_intermediate_pair_is_torch_cosine_distance(megatron_single_rank, trained_checkpoint):
    """A ``decoder.final_layernorm`` pair: the logged intermediate loss is the masked mean of
    1 - cos(student, teacher) of the two norms' outputs (torch, float64), and modelopt's
    balancer scales it to the logit loss's magnitude, so the trained total is twice the KL."""
    from engine.model_io import load_model
    from engine.objectives.distill import DistillObjective
    from models.build import build_gpt_chunks

    teacher_dir = trained_checkpoint("tiny-llama")
    pair = "[{student: decoder.final_layernorm, teacher: decoder.final_layernorm}]"
    cfg = _cfg(teacher_dir, f"objective.distill.intermediate_layer_pairs={pair}")
    teacher = load_model(teacher_dir).model
    objective = DistillObjective(cfg)
    (student,) = build_gpt_chunks(cfg, torch.float32).chunks
    batch = _batch()
    captured = {}
    hooks = [
        m.decoder.final_layernorm.register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o.detach()))
        for k, m in (("s", student), ("t", teacher))
    ]
    with torch.no_grad():
        args = (batch["tokens"], batch["position_ids"], None)
        kl, _ = _oracle(student(*args), teacher(*args), batch["labels"], batch["loss_mask"], 1.0)
    for h in hooks:
        h.remove()
    cos = F.cosine_similarity(captured["s"].double(), captured["t"].double(), dim=-1).transpose(0, 1)  # [b, s]
    mask = batch["loss_mask"].double()
    expected = float(((1 - cos) * mask).sum() / mask.sum())
    (model,) = objective.wrap_model([student])
    output, loss_func = objective.forward_step(iter([batch]), model)
    _, _, metrics = loss_func(output)
    got = objective.finalize_metrics({k: float(v) for k, v in metrics.items()})
    assert expected > 1e-3, expected
    assert got["intermediate_loss"] == pytest.approx(expected, rel=1e-4)
    assert got["kd_loss"] == pytest.approx(kl, rel=1e-4)
    assert got["loss"] == pytest.approx(2 * kl, rel=1e-4)


def test_kd_loss_falls_and_checkpoint_holds_only_the_student(post_training_data, trained_checkpoint, tmp_path):
    """The CLI distils the trained tiny-llama (4 layers, hidden 64) into a fresh 2-layer,
    hidden-32 student: KD and LM losses are logged separately, the KD loss falls, and the
    checkpoint's tensors are exactly those of a plain checkpoint of the student's shape."""
    from torch.distributed.checkpoint import FileSystemReader

    teacher_dir = trained_checkpoint("tiny-llama")
    run_dir = tmp_path / "student"
    cfg = post_training_config(post_training_data, run_dir, "distill", "pretrain")
    cfg["model"].update(num_layers=2, hidden_size=32, ffn_hidden_size=96)
    cfg["objective"]["distill"] = {"teacher": str(teacher_dir)}
    cfg["training"].update(steps=6, global_batch_size=4, micro_batch_size=2)
    proc = run_engine(cfg)
    assert "distill: teacher" in proc.stdout and "| kd_loss " in proc.stdout and "| lm_loss " in proc.stdout
    rows = step_metrics(run_dir)
    assert len(rows) == 6
    kd = [r["kd_loss"] for r in rows]
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-6) for r in rows)  # skip_lm_loss: KD alone
    assert all(4.0 < r["lm_loss"] < 9.0 for r in rows)  # logged although not trained on
    assert kd[-1] < 0.6 * kd[0], kd

    saved = FileSystemReader(str(run_dir / "checkpoints" / "iter_0000006")).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in saved.items() if hasattr(v, "size")}
    assert not any("teacher" in k for k in saved)
    assert shapes["embedding.word_embeddings.weight"] == (VOCAB, 32)
    assert shapes["decoder.layers.mlp.linear_fc2.weight"] == (2, 32, 96)
    teacher = FileSystemReader(str(sorted((teacher_dir / "checkpoints").glob("iter_*"))[-1])).read_metadata()

    def names(keys):  # per-layer extra states are stored one shard per layer: drop the count
        return {k.split("/shard_")[0] for k in keys}

    assert names(saved) == names(teacher.state_dict_metadata)  # the same tensors as a plain checkpoint


def test_bad_teachers_are_one_line_config_errors(megatron_single_rank, trained_checkpoint, tmp_path, monkeypatch):
    from engine.objectives.distill import DistillObjective

    teacher_dir = trained_checkpoint("tiny-llama")
    cases = [
        (_cfg("null"), "needs objective.distill.teacher"),
        (_cfg(tmp_path / "nowhere"), "objective.distill.teacher: "),
        (_cfg(teacher_dir, "model.vocab_size=2048"), "vocabulary 1024 (padded 1024), the student 2048"),
        (
            _cfg(
                teacher_dir,
                "model.hidden_size=32",
                "objective.distill.intermediate_layer_pairs=[{student: decoder.final_layernorm, teacher: decoder.final_layernorm}]",
            ),
            "hidden size (64) to equal the student's (32)",
        ),
        (_cfg(teacher_dir, "parallel.pipeline=2", "parallel.virtual_pipeline=2"), "virtual_pipeline"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            DistillObjective(cfg)
        assert "\n" not in str(err.value)

    # A layer name the model does not have: refused on every rank, in one line.
    cfg = _cfg(
        teacher_dir,
        "objective.distill.intermediate_layer_pairs=[{student: decoder.nowhere, teacher: decoder.final_layernorm}]",
    )
    from models.build import build_gpt_chunks

    with pytest.raises(ConfigError, match="intermediate_layer_pairs: .*nowhere") as err:
        DistillObjective(cfg).wrap_model(build_gpt_chunks(cfg, torch.float32).chunks)
    assert "\n" not in str(err.value)

    # Without nvidia-modelopt: what to install, in one line.
    for name in [m for m in sys.modules if m == "modelopt" or m.startswith("modelopt.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "modelopt", None)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[opt\]") as err:
        DistillObjective(_cfg(teacher_dir))
    assert "\n" not in str(err.value)


def test_distill_is_listed_with_its_settings():
    cfg = _cfg(Path("t"), "objective.distill.intermediate_layer_pairs=[{student: a, teacher: b, loss: mse}]")
    assert cfg.objective.distill.intermediate_layer_pairs[0].loss == "mse"
    with pytest.raises(ConfigError, match="choose one of cosine, mse"):
        _cfg(Path("t"), "objective.distill.intermediate_layer_pairs=[{student: a, teacher: b, loss: l1}]")
    with pytest.raises(ConfigError, match="logit_kl_temperature' must be > 0"):
        _cfg(Path("t"), "objective.distill.logit_kl_temperature=0")

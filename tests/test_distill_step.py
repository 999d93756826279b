"""One distillation step at TP=1, TP=2 and PP=2 against a float64 reference (transformers + explicit KL).

The reference computes, per aligned token, the divergence between the student's distribution after
x + y<t and the teacher's after x + body(y) + delim + y<t, from the HF models in float64; the step's
loss (token-level mean over the batch) must equal it. The optimizer step must move the student and
leave the teacher bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_sdzero.conversion.convert import hf_to_mcore
from megatron_sdzero.data.formatting import ChatFormat, build_messages, resolve_phrases
from megatron_sdzero.distill.batch import BatchConfig, DistillBatch, RolloutSample, build_batch
from megatron_sdzero.runtime.launch import run_on_ranks


@pytest.fixture(scope="module")
def models(tiny_hf_models, tmp_path_factory) -> dict[str, Path]:
    from conftest import _make

    root = tmp_path_factory.mktemp("step")
    student_hf = tiny_hf_models["qwen3_tied"]
    teacher_hf = _make(root, "teacher", family="qwen3", tie_word_embeddings=True, num_layers=4,
                       initializer_range=0.15, seed=11)  # fmt: skip
    return {
        "student_hf": student_hf,
        "teacher_hf": teacher_hf,
        "student": hf_to_mcore(student_hf, root / "student_mc"),
        "teacher": hf_to_mcore(teacher_hf, root / "teacher_mc"),
    }


def _batch(hf_dir: Path) -> DistillBatch:
    from transformers import AutoTokenizer

    fmt = ChatFormat(AutoTokenizer.from_pretrained(hf_dir))
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, (length, stopped) in enumerate([(9, True), (14, False), (5, True), (11, True)]):
        prompt = fmt.prompt_ids(build_messages(f"What is {i} + {2 * i}?", "math"))
        y = torch.randint(3, 700, (length,), generator=generator).tolist()
        samples.append(RolloutSample(prompt, y + [fmt.end_of_turn_id] * stopped, float(i % 2)))
    return build_batch(samples, fmt, resolve_phrases("qwen3"), BatchConfig(pad_to_multiple_of=4))


def _reference_loss(models: dict[str, Path], batch: DistillBatch, kind: str, top_k: int | None) -> float:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(models["student_hf"], dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher_hf"], dtype=torch.float64).eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for b in range(batch.size):
            mask = batch.loss_mask[b]
            s = student(batch.student_tokens[b : b + 1]).logits[0, batch.student_index[b][mask]]
            t = teacher(batch.teacher_tokens[b : b + 1]).logits[0, batch.teacher_index[b][mask]]
            total += _divergence(s, t, kind, top_k).sum() * batch.sample_weights[b].double()
            count += int(mask.sum()) if batch.sample_weights[b] > 0 else 0
    return float(total / count)


def _divergence(s: torch.Tensor, t: torch.Tensor, kind: str, top_k: int | None) -> torch.Tensor:
    if top_k is not None:  # the teacher's top-k ids, both renormalised over them
        ids = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, ids), t.gather(-1, ids)
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    reverse = (log_s.exp() * (log_s - log_t)).sum(-1)
    forward = (log_t.exp() * (log_t - log_s)).sum(-1)
    return {"reverse": reverse, "forward": forward, "mixed": 0.5 * forward + 0.5 * reverse}[kind]


def _step(paths: dict[str, str], tp: int, pp: int, batch: DistillBatch, kind: str, top_k: int | None) -> dict:
    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.distill.step import distill_step
    from megatron_sdzero.distill.teacher import Teacher, TeacherConfig
    from megatron_sdzero.losses import DistillLossConfig
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.setup import build_frozen, setup_trainable

    init_model_parallel(ParallelConfig(tp=tp, pp=pp))
    meta = ModelMeta.read(Path(paths["student"]))
    arch, model_cfg = meta.arch, ModelConfig(params_dtype="float32", transformer_impl="local")
    train = TrainConfig(lr=1e-3, lr_schedule="constant", warmup_steps=0, train_iters=4, global_batch_size=4)
    student = setup_trainable(arch, model_cfg, train, train_iters=4)
    checkpoint.finetune_from(paths["student"], student)
    teacher_chunks = build_frozen(arch, model_cfg)
    checkpoint.finetune_from(paths["teacher"], teacher_chunks)
    teacher = Teacher(teacher_chunks, TeacherConfig())
    before_student = [p.detach().clone() for p in student.modules[0].parameters()]
    before_teacher = [p.detach().clone() for p in teacher_chunks[0].parameters()]
    result = distill_step(
        student, teacher, batch, DistillLossConfig(kind=kind, top_k=top_k, chunk_tokens=7), arch.vocab_size,
        micro_batch_size=2,
    )  # fmt: skip
    return {
        "loss": result.loss,
        "tokens": result.num_tokens,
        "skipped": result.skipped,
        "student_moved": all(
            not torch.equal(a, b)
            for a, b in zip(before_student, student.modules[0].parameters(), strict=True)
        ),
        "teacher_fixed": all(
            torch.equal(a, b) for a, b in zip(before_teacher, teacher_chunks[0].parameters(), strict=True)
        ),
        "teacher_grads": any(p.grad is not None for p in teacher_chunks[0].parameters()),
    }


CASES = [(1, 1, "reverse", None), (2, 1, "reverse", None), (1, 2, "reverse", None), (2, 1, "mixed", 16)]


@pytest.mark.parametrize(("tp", "pp", "kind", "top_k"), CASES, ids=["tp1", "tp2", "pp2", "tp2-mixed-top16"])
def test_distill_step_matches_the_float64_reference(models, tp, pp, kind, top_k) -> None:
    batch = _batch(models["student_hf"])
    assert batch.valid_tokens() == 9 + 1 + 14 + 5 + 1 + 11 + 1
    reference = _reference_loss(models, batch, kind, top_k)
    paths = {k: str(v) for k, v in models.items()}
    results = run_on_ranks(_step, tp * pp, paths, tp, pp, batch, kind, top_k, timeout_s=300)
    for rank in results:
        assert rank["loss"] == pytest.approx(reference, rel=2e-5), (rank["loss"], reference)
        assert rank["tokens"] == batch.valid_tokens() and not rank["skipped"]
        assert rank["student_moved"] and rank["teacher_fixed"] and not rank["teacher_grads"]
    assert reference > 0.1


def test_the_teacher_forward_runs_in_grad_mode_without_a_graph() -> None:
    """TransformerEngine updates FP8 delayed-scaling statistics only in grad mode (measured on the
    GPU: a no_grad FP8 teacher keeps its first-pass scales), so the frozen forward keeps grad mode
    on; with frozen parameters and token inputs nothing is recorded."""
    from megatron_sdzero.distill.step import frozen_forward
    from megatron_sdzero.distill.teacher import Teacher, TeacherConfig

    teacher = Teacher([torch.nn.Embedding(10, 4)], TeacherConfig())
    with torch.no_grad(), frozen_forward(teacher):
        assert torch.is_grad_enabled()
        out = teacher.chunks[0](torch.tensor([1, 2, 3]))
    assert out.grad_fn is None and not out.requires_grad

    teacher.chunks[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must be frozen"):
        with frozen_forward(teacher):
            pass

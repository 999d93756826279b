"""Checkpoints: resume in a fresh process reproduces the uninterrupted losses exactly (CPU, fp32),
for both distributed-optimizer formats and at DP=2; a fully_reshardable checkpoint written at TP=2
resumes at TP=1; a dp_reshardable one refuses another TP unless the optimizer is left out; extra
entries round-trip; the NaN policy skips or stops and a non-finite model is never saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training_parallel import training_setup

from megatron_sdzero.runtime.launch import run_on_ranks

STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module")
def setup(tiny_hf_models, tmp_path_factory) -> dict:
    return training_setup(tiny_hf_models, tmp_path_factory)


def _build(mcore: str, tp: int, pp: int, seed: int = 7):
    import torch

    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.setup import setup_trainable

    torch.set_num_threads(1)
    init_model_parallel(ParallelConfig(tp=tp, pp=pp), seed=seed)
    meta = ModelMeta.read(Path(mcore))
    train = TrainConfig(
        lr=2e-3,
        warmup_steps=1,
        train_iters=STEPS,
        epochs=None,
        global_batch_size=4,
        micro_batch_size=1,
        clip_grad=0.5,
        weight_decay=0.01,
    )
    model_cfg = ModelConfig(params_dtype="float32", transformer_impl="local")
    return meta, setup_trainable(meta.arch, model_cfg, train, STEPS)


def _steps(
    trainable, samples, data, start: int, stop: int, arch, poison_at: int | None = None, policy="skip"
):
    from megatron.core import parallel_state as ps

    from megatron_sdzero.training.forward import make_sft_forward_step
    from megatron_sdzero.training.sft_data import collate_rows, make_plan
    from megatron_sdzero.training.step import train_step

    lengths = [len(ids) - 1 for ids, _ in samples]
    plan = make_plan(lengths, data, seed=3, global_batch_size=4, epochs=None, train_iters=STEPS)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    forward_step = make_sft_forward_step("mask", arch.vocab_size)
    results = []
    for iteration in range(start, stop):
        micro = [
            collate_rows(samples, rows, data) for rows in plan.rank_micro_batches(iteration, dp_rank, dp, 1)
        ]
        hook = None
        if iteration == poison_at:  # NaN embeddings for this step: NaN loss and gradients, weights intact
            embedding = trainable.modules[0].embedding
            hook = embedding.register_forward_hook(lambda module, args, out: out * float("nan"))
        try:
            results.append(
                train_step(
                    forward_step,
                    iter(micro),
                    trainable.model,
                    trainable.optimizer,
                    trainable.scheduler,
                    num_microbatches=len(micro),
                    seq_length=data.seq_length,
                    micro_batch_size=1,
                    nan_policy=policy,
                )
            )
        finally:
            if hook is not None:
                hook.remove()
    return results


FORMATS = ("dp_reshardable", "fully_reshardable")


def _ema_template(value):
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    # One replica id per rank, so exactly one rank writes this unsharded tensor.
    return ShardedTensor.from_rank_offsets("extra.ema", value, replica_id=dist.get_rank())


def _run_and_save(mcore, samples, data, tp, pp, roots: dict[str, str]) -> dict:
    """STEPS steps; at SAVE_AT a checkpoint in each format (one root per format)."""
    import torch

    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import CheckpointConfig

    meta, trainable = _build(mcore, tp, pp)
    checkpoint.finetune_from(mcore, trainable)
    first = _steps(trainable, samples, data, 0, SAVE_AT, meta.arch)
    for fmt, root in roots.items():
        checkpoint.save(
            root,
            SAVE_AT,
            trainable,
            config=CheckpointConfig(save=root, optimizer_format=fmt),
            meta=meta,
            data_state={"consumed": SAVE_AT * 4},
            extra_common={"note": "x"},
            extra_sharded={"ema": _ema_template(torch.arange(6.0).reshape(2, 3))},
        )
    rest = _steps(trainable, samples, data, SAVE_AT, STEPS, meta.arch)
    return {"loss": [r.loss for r in first + rest]}


def _resume_one(mcore, samples, data, tp, pp, fmt, root, load_optimizer=True) -> dict:
    import torch

    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import CheckpointConfig

    meta, trainable = _build(mcore, tp, pp, seed=99)  # another seed: nothing may depend on it
    config = CheckpointConfig(save=root, optimizer_format=fmt, load_optimizer=load_optimizer)
    try:
        state = checkpoint.load(
            root, trainable, config=config, extra_sharded={"ema": _ema_template(torch.zeros(2, 3))}
        )
    except Exception as err:  # noqa: BLE001 - the test inspects the message
        return {"error": f"{type(err).__name__}: {err}"}
    rest = _steps(trainable, samples, data, state.iteration, STEPS, meta.arch)
    return {
        "iteration": state.iteration,
        "data_state": state.data_state,
        "extra_common": state.extra_common,
        "ema": state.extra_sharded["ema"].tolist(),
        "loss": [r.loss for r in rest],
        "optimizer_loaded": state.optimizer_loaded,
    }


def _resume(mcore, samples, data, tp, pp, cases: list[tuple]) -> list[dict]:
    """Several resumes in one process, each into a freshly built model: (fmt, root, load_optimizer)."""
    return [_resume_one(mcore, samples, data, tp, pp, *case) for case in cases]


def _args(setup):
    return setup["mcore"], setup["samples"], setup["data"]


def _roots(base: Path) -> dict[str, str]:
    return {fmt: str(base / fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def tp1_run(setup, tmp_path_factory) -> dict:
    roots = _roots(tmp_path_factory.mktemp("ckpt_tp1"))
    (full,) = run_on_ranks(_run_and_save, 1, *_args(setup), 1, 1, roots, timeout_s=300)
    return {"roots": roots, "loss": full["loss"]}


def test_resume_is_exact_in_a_fresh_process_in_both_formats(setup, tp1_run) -> None:
    cases = [(fmt, root) for fmt, root in tp1_run["roots"].items()]
    (resumed,) = run_on_ranks(_resume, 1, *_args(setup), 1, 1, cases, timeout_s=300)
    for fmt, result in zip(FORMATS, resumed, strict=True):
        assert result["iteration"] == SAVE_AT and result["optimizer_loaded"], fmt
        assert result["data_state"] == {"consumed": SAVE_AT * 4}
        assert result["extra_common"] == {"note": "x"}
        assert result["ema"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert result["loss"] == tp1_run["loss"][SAVE_AT:], fmt  # bit-identical


def test_checkpoint_layout(tp1_run) -> None:
    root = Path(tp1_run["roots"]["dp_reshardable"])
    assert (root / "latest_checkpointed_iteration.txt").read_text() == str(SAVE_AT)
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
        "sdzero_model.json",
    ]
    assert json.loads((root / "sdzero_model.json").read_text())["family"] == "qwen3"


def test_resume_at_dp2_is_exact(setup, tp1_run, tmp_path) -> None:
    roots = {"dp_reshardable": str(tmp_path / "run")}
    full = run_on_ranks(_run_and_save, 2, *_args(setup), 1, 1, roots, timeout_s=300)
    resumed = run_on_ranks(
        _resume, 2, *_args(setup), 1, 1, [("dp_reshardable", roots["dp_reshardable"])], timeout_s=300
    )
    for before, (after,) in zip(full, resumed, strict=True):
        assert after["loss"] == before["loss"][SAVE_AT:]
        assert before["loss"] == pytest.approx(tp1_run["loss"], rel=2e-6)


def test_tp2_checkpoints_at_tp1(setup, tp1_run, tmp_path) -> None:
    """fully_reshardable resumes at TP=1; dp_reshardable refuses unless the optimizer is left out."""
    roots = _roots(tmp_path)
    run_on_ranks(_run_and_save, 2, *_args(setup), 2, 1, roots, timeout_s=300)
    cases = [
        ("fully_reshardable", roots["fully_reshardable"]),
        ("dp_reshardable", roots["dp_reshardable"]),
        ("dp_reshardable", roots["dp_reshardable"], False),
    ]
    (results,) = run_on_ranks(_resume, 1, *_args(setup), 1, 1, cases, timeout_s=300)
    resharded, refused, weights_only = results
    assert resharded["optimizer_loaded"]
    assert resharded["loss"] == pytest.approx(tp1_run["loss"][SAVE_AT:], rel=2e-6)
    assert "dp_reshardable" in refused["error"] and "load_optimizer=false" in refused["error"]
    assert not weights_only["optimizer_loaded"] and weights_only["iteration"] == SAVE_AT
    # The first resumed loss is computed before any update: same weights, same loss.
    assert weights_only["loss"][0] == pytest.approx(tp1_run["loss"][SAVE_AT], rel=2e-6)


def _nan_policy(mcore, samples, data, policy: str, root: str) -> dict:
    import torch

    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import CheckpointConfig
    from megatron_sdzero.training.step import NonFiniteStepError

    meta, trainable = _build(mcore, 1, 1)
    checkpoint.finetune_from(mcore, trainable)
    _steps(trainable, samples, data, 0, 1, meta.arch)
    steps_before = trainable.scheduler.num_steps
    main_params = [p.detach().clone() for g in trainable.optimizer.param_groups for p in g["params"]]
    try:
        (result,) = _steps(trainable, samples, data, 1, 2, meta.arch, poison_at=1, policy=policy)
    except NonFiniteStepError as err:
        return {"error": str(err)}
    after = [p.detach().clone() for g in trainable.optimizer.param_groups for p in g["params"]]
    advanced = trainable.scheduler.num_steps != steps_before
    finite_step = _steps(trainable, samples, data, 2, 3, meta.arch)[0]
    with torch.no_grad():
        next(trainable.modules[0].parameters())[0] = float("nan")
    saved = "no error"
    try:
        checkpoint.save(root, 2, trainable, config=CheckpointConfig(save=root), meta=meta, data_state={})
    except checkpoint.CorruptStateError as err:
        saved = str(err)
    return {
        "skipped": result.skipped,
        "loss": result.loss,
        "main_params_unchanged": all(torch.equal(a, b) for a, b in zip(main_params, after, strict=True)),
        "scheduler_advanced": advanced,
        "next_step_ok": not finite_step.skipped and finite_step.loss == finite_step.loss,
        "save": saved,
        "written": sorted(p.name for p in Path(root).iterdir()) if Path(root).exists() else [],
    }


def _nan_policies(mcore, samples, data, root: str) -> dict:
    return {
        policy: _nan_policy(mcore, samples, data, policy, f"{root}/{policy}") for policy in ("skip", "stop")
    }


def test_nan_policy_and_no_corrupt_checkpoint(setup, tmp_path) -> None:
    (results,) = run_on_ranks(_nan_policies, 1, *_args(setup), str(tmp_path), timeout_s=300)
    skipped, stopped = results["skip"], results["stop"]
    assert skipped["skipped"] and skipped["loss"] != skipped["loss"]  # NaN
    assert skipped["main_params_unchanged"] and not skipped["scheduler_advanced"] and skipped["next_step_ok"]
    assert "not finite" in skipped["save"] and skipped["written"] == []
    assert "non-finite step" in stopped["error"] and "no checkpoint was written" in stopped["error"]

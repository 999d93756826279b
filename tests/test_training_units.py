"""Fast checks of the loop's pure parts: FLOPs/MFU, the LR schedule, the data plan, exit requests,
the step line and metrics file, configs and the SFT recipes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from megatron_sdzero.config import ConfigError, load_config
from megatron_sdzero.training.config import LoggingConfig, TrainConfig
from megatron_sdzero.training.flops import FlopsModel, mfu, tflops_per_gpu
from megatron_sdzero.training.sft_data import DataPlan, SFTDataConfig, make_plan
from megatron_sdzero.training.signals import ExitRequest
from megatron_sdzero.training.step import StepResult

REPO = Path(__file__).resolve().parents[1]
QWEN3_4B = FlopsModel(
    num_layers=36,
    hidden_size=2560,
    ffn_hidden_size=9728,
    num_attention_heads=32,
    num_query_groups=8,
    head_dim=128,
    padded_vocab_size=151936,
)


def _megatron_lm_flops(m: FlopsModel, batch: int, seq: int) -> float:
    """Megatron-LM's num_floating_point_operations (dense, GQA, SwiGLU), written out as it stands."""
    query_projection_to_hidden_size_ratio = m.num_attention_heads * m.head_dim / m.hidden_size
    expansion_factor = 3 * 2 * 2
    return (
        expansion_factor
        * batch
        * seq
        * m.num_layers
        * m.hidden_size
        * m.hidden_size
        * (
            (
                (1 + (m.num_query_groups / m.num_attention_heads) + (seq / m.hidden_size))
                * query_projection_to_hidden_size_ratio
            )
            + (m.ffn_hidden_size / m.hidden_size) * 1 * (3 / 2)
            + (m.padded_vocab_size / (2 * m.num_layers * m.hidden_size))
        )
    )


def test_flops_match_megatron_lm_and_split_per_sample() -> None:
    assert QWEN3_4B.step_flops([4096] * 8) == pytest.approx(_megatron_lm_flops(QWEN3_4B, 8, 4096), rel=1e-12)
    # Packing: each sample attends only to itself, so FLOPs add up per sample.
    packed = QWEN3_4B.step_flops([1000, 3000])
    assert packed == pytest.approx(
        _megatron_lm_flops(QWEN3_4B, 1, 1000) + _megatron_lm_flops(QWEN3_4B, 1, 3000)
    )
    assert packed < _megatron_lm_flops(QWEN3_4B, 1, 4000)
    assert QWEN3_4B.flops_per_token(4096) * 4096 == pytest.approx(_megatron_lm_flops(QWEN3_4B, 1, 4096))
    assert mfu(989e12 * 2, 1.0, 2, 989.0) == pytest.approx(1.0)
    assert tflops_per_gpu(3e12, 2.0, 1) == pytest.approx(1.5)


class _FakeOptimizer:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (
            "cosine",
            [0.0, 0.5, 1.0, 0.933013, 0.75, 0.5, 0.25, 0.066987],
        ),  # = HF get_cosine_schedule_with_warmup
        ("linear", [0.0, 0.5, 1.0, 0.833333, 0.666667, 0.5, 0.333333, 0.166667]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_lr_schedule_warms_up_then_decays(schedule, expected) -> None:
    from megatron_sdzero.training.setup import _scheduler

    train = TrainConfig(
        lr=1.0, min_lr=0.0, lr_schedule=schedule, warmup_ratio=0.25, train_iters=8, epochs=None
    )
    assert train.warmup_iters(8) == 2
    optimizer = _FakeOptimizer()
    scheduler = _scheduler(optimizer, train, 8)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_phase2_style_warmup_from_a_fraction() -> None:
    from megatron_sdzero.training.setup import _scheduler

    train = TrainConfig(
        lr=1.0, warmup_init_lr=0.1, warmup_steps=4, lr_schedule="constant", train_iters=10, epochs=None
    )
    optimizer = _FakeOptimizer()
    scheduler = _scheduler(optimizer, train, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    scheduler.step(2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.55)


def test_train_config_checks() -> None:
    assert TrainConfig(global_batch_size=8, micro_batch_size=2).num_microbatches(2) == 2
    with pytest.raises(ValueError, match="not divisible"):
        TrainConfig(global_batch_size=6, micro_batch_size=2).num_microbatches(2)
    with pytest.raises(ValueError, match="epochs or train.train_iters"):
        TrainConfig(epochs=None, train_iters=None)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-6, min_lr=1e-5)


def test_plan_is_deterministic_covers_epochs_and_splits_over_ranks() -> None:
    lengths = [30, 50, 20, 70, 10, 40, 60, 25, 35, 45]
    data = SFTDataConfig(seq_length=100, packing=True)
    plan = make_plan(lengths, data, seed=1, global_batch_size=2, epochs=2, train_iters=None)
    again = make_plan(lengths, data, seed=1, global_batch_size=2, epochs=2, train_iters=None)
    assert plan == again and plan.epochs == 2
    assert all(sum(lengths[i] for i in row) <= 100 for row in plan.rows)
    used = Counter(i for row in plan.rows for i in row)  # each sample once per epoch (the tail may be cut)
    assert set(used) <= set(range(10)) and max(used.values()) <= 2 and sum(used.values()) >= 15
    other_seed = make_plan(lengths, data, seed=2, global_batch_size=2, epochs=2, train_iters=None)
    assert other_seed.rows != plan.rows
    # Two data-parallel ranks split each global batch; together they hold it exactly.
    for iteration in range(plan.train_iters):
        mine = [plan.rank_micro_batches(iteration, r, 2, 1) for r in range(2)]
        assert [row for rank in mine for mb in rank for row in mb] == plan.global_batch(iteration)
    assert plan.consumed_samples(plan.train_iters) == sum(len(r) for r in plan.rows)


def test_plan_by_iterations_repeats_epochs_and_rejects_tiny_data() -> None:
    data = SFTDataConfig(seq_length=100, packing=False)
    plan = make_plan([10, 20, 30], data, seed=0, global_batch_size=2, epochs=None, train_iters=5)
    assert plan.train_iters == 5 and plan.epochs == 4 and len(plan.rows) == 10
    assert isinstance(plan, DataPlan) and plan.global_batch(4) == plan.rows[8:10]
    with pytest.raises(IndexError):
        plan.global_batch(5)
    with pytest.raises(ValueError, match="no global batch"):
        make_plan([10], data, seed=0, global_batch_size=4, epochs=1, train_iters=None)


def test_dataset_truncates_or_drops_overlong_samples(tiny_hf_models, tmp_path) -> None:
    from transformers import AutoTokenizer

    from megatron_sdzero.training.demo_data import write_demo_data
    from megatron_sdzero.training.sft_data import SFTDataset, collate_rows

    hf = tiny_hf_models["qwen3_tied"]
    paths = write_demo_data(hf, tmp_path, n=6)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    full = SFTDataset.from_jsonl(paths[2], tokenizer, SFTDataConfig(seq_length=4096))
    longest = max(full.lengths)
    cut = SFTDataConfig(seq_length=longest - 5)
    truncated = SFTDataset.from_jsonl(paths[2], tokenizer, cut)
    assert truncated.stats.truncated >= 1 and max(truncated.lengths) == longest - 5
    dropped = SFTDataset.from_jsonl(
        paths[2], tokenizer, SFTDataConfig(seq_length=longest - 5, overlong="drop")
    )
    assert len(dropped) == len(full) - dropped.stats.dropped_overlong and dropped.stats.dropped_overlong >= 1
    same = SFTDataset.from_jsonl(paths[2], tokenizer, SFTDataConfig(seq_length=4096))
    assert full.fingerprint() == same.fingerprint() != truncated.fingerprint()
    # Stage 2 trains only on the revision: the prompt, y_init and the phrase are masked.
    ids, mask = full.samples[0]
    assert 0 < sum(mask) < len(mask) and mask[-1] == 1 and mask[0] == 0
    batch = collate_rows(full.samples, [[0], [1]], SFTDataConfig(seq_length=4096, pad_to_multiple_of=64))
    assert batch.tokens.shape[1] % 64 == 0 and batch.tokens.shape[1] >= max(full.lengths[:2])


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_exit_request_on_signal(name) -> None:
    request = ExitRequest(["SIGTERM", "SIGUSR1"])
    try:
        assert request.should_exit() is None
        os.kill(os.getpid(), getattr(signal, name))
        assert request.should_exit() == f"signal {name}"
    finally:
        request.close()
    assert signal.getsignal(getattr(signal, name)) is not request._handle


def test_exit_request_on_stop_file_and_time(tmp_path) -> None:
    from megatron_sdzero.training import signals

    stop = tmp_path / "stop"
    elapsed_minutes = (time.monotonic() - signals._PROCESS_START) / 60
    request = ExitRequest([], stop_file=stop, max_minutes=elapsed_minutes + 0.5 / 60)
    assert request.should_exit() is None
    stop.touch()
    assert request.should_exit() == "stop file"
    stop.unlink()
    time.sleep(0.6)
    assert request.should_exit() == "time limit"
    with pytest.raises(ValueError, match="unknown signal"):
        ExitRequest(["SIGNOPE"])


def test_step_logger_line_and_metrics(tmp_path, capsys) -> None:
    from megatron_sdzero.training.logging import StepLogger

    logger = StepLogger(
        LoggingConfig(interval=2, progress=False, tensorboard_dir=None),
        tmp_path,
        flops=QWEN3_4B,
        world_size=8,
        train_iters=4,
    )
    result = StepResult(
        loss=0.004546,
        num_tokens=900,
        grad_norm=0.5,
        skipped=False,
        lr=5e-6,
        logs={"loss": 0.004546, "kl": 0.0123},
    )
    for iteration in (1, 2):
        logger.log(
            iteration,
            result,
            seconds=2.0,
            tokens=32768,
            sample_lengths=[4096] * 8,
            consumed_samples=8 * iteration,
            skipped_total=0,
        )
    logger.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    assert len(lines) == 1  # every second step
    fields = [
        "iteration        2/       4",
        "consumed samples:           16",
        "elapsed time per iteration (ms): 2000.0",
        "tokens/s: 16384.0",
        "TFLOP/s/GPU:",
        "MFU:",
        "learning rate: 5.000000E-06",
        "loss: 0.004546 |",
        "kl: 0.0123 |",
        "grad norm: 0.500",
        "skipped iterations:   0",
    ]
    for field in fields:
        assert field in lines[0], field
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected_tflops = QWEN3_4B.step_flops([4096] * 8) / 2.0 / 8 / 1e12
    assert [r["iteration"] for r in records] == [1, 2]
    printed_loss = float(lines[0].split("loss: ")[1].split(" |")[0])
    assert printed_loss == records[1]["loss"]  # one unit in both places
    assert records[1]["tflops_per_gpu"] == pytest.approx(expected_tflops)
    assert records[1]["mfu"] == pytest.approx(expected_tflops / 989.0)


@pytest.mark.parametrize("recipe", ["sft_qwen3_4b.yaml", "sft_olmo3_7b.yaml"])
def test_recipes_carry_the_reference_hyperparameters(recipe) -> None:
    from megatron_sdzero.training.sft import SFTConfig

    config = load_config(SFTConfig, REPO / "examples" / recipe)
    train = config.train
    assert (train.lr, train.lr_schedule, train.warmup_ratio, train.weight_decay) == (
        5e-6,
        "cosine",
        0.05,
        1e-4,
    )
    assert (train.adam_beta1, train.adam_beta2, train.epochs, train.global_batch_size) == (0.9, 0.95, 3, 4)
    assert config.data.seq_length == 32768 and config.model.params_dtype == "bfloat16"
    assert config.model.recompute == "full" and config.stages == [1, 2]


def test_sft_config_errors() -> None:
    from megatron_sdzero.training.sft import SFTConfig

    with pytest.raises(ConfigError, match="init"):
        load_config(SFTConfig, None, ["data.stage1=a.jsonl", "data.stage2=b.jsonl"])
    with pytest.raises(ConfigError, match="stage2"):
        load_config(SFTConfig, None, ["init=x", "data.stage1=a.jsonl"])
    with pytest.raises(ConfigError, match="stages"):
        load_config(SFTConfig, None, ["init=x", "data.stage1=a.jsonl", "stages=[2, 1]"])
    config = load_config(SFTConfig, None, ["init=x", "data.stage2=b.jsonl", "stages=[2]"])
    assert config.stages == [2]

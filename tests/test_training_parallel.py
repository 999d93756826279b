"""The SFT step at TP=2, PP=2, PP=2 x VPP=2 and DP=2 gives the losses of one rank (fp32, CPU, gloo).

Same converted weights, same packed data plan, a few optimizer steps (AdamW, the distributed
optimizer, clipping): every layout must follow the single-rank losses and gradient norms within
fp32 tolerance, step after step (so the updates agree too, not only the first forward).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_sdzero.runtime.launch import run_on_ranks
from megatron_sdzero.training.sft_data import SFTDataConfig, SFTDataset

STEPS = 3


def training_setup(tiny_hf_models, tmp_path_factory) -> dict:
    """A float32 conversion of the 4-layer untied tiny Qwen3 and packed demo samples (once per session)."""
    from transformers import AutoTokenizer

    from megatron_sdzero.conversion.convert import hf_to_mcore
    from megatron_sdzero.training.demo_data import write_demo_data

    root = tmp_path_factory.getbasetemp() / "training_setup"
    hf = tiny_hf_models["qwen3_untied"]  # 4 layers, untied: the output layer is its own shard
    if not (root / "mc").is_dir():
        hf_to_mcore(hf, root / "mc", params_dtype="float32")
    paths = write_demo_data(hf, root / "data", n=24)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    data = SFTDataConfig(stage1=str(paths[1]), seq_length=256, packing=True)
    dataset = SFTDataset.from_jsonl(paths[1], tokenizer, data)
    return {"mcore": str(root / "mc"), "hf": hf, "samples": dataset.samples, "data": data, "paths": paths}


@pytest.fixture(scope="module")
def setup(tiny_hf_models, tmp_path_factory) -> dict:
    return training_setup(tiny_hf_models, tmp_path_factory)


def _train(
    mcore: str,
    samples,
    data: SFTDataConfig,
    tp: int,
    pp: int,
    vpp: int | None,
    recompute: str = "none",
    packing: bool = True,
) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_sdzero.conversion.megatron_io import ModelMeta
    from megatron_sdzero.models.builder import ModelConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel
    from megatron_sdzero.training import checkpoint
    from megatron_sdzero.training.config import TrainConfig
    from megatron_sdzero.training.forward import make_sft_forward_step
    from megatron_sdzero.training.setup import setup_trainable
    from megatron_sdzero.training.sft_data import DatasetStats, collate_rows, make_plan
    from megatron_sdzero.training.step import train_step

    torch.set_num_threads(1)
    data = dataclasses.replace(data, packing=packing, pad_to_multiple_of=16)
    init_model_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp), seed=7)
    arch = ModelMeta.read(Path(mcore)).arch
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
    # Unpacked micro-batches differ in length: the pipeline exchanges shapes (as sft.py sets it).
    overrides = {"variable_seq_lengths": True} if pp > 1 and not packing else {}
    model_cfg = ModelConfig(params_dtype="float32", transformer_impl="local", recompute=recompute)
    trainable = setup_trainable(arch, model_cfg, train, STEPS, **overrides)
    checkpoint.finetune_from(mcore, trainable)
    dataset = SFTDataset(samples, DatasetStats())
    plan = make_plan(dataset.lengths, data, seed=3, global_batch_size=4, epochs=None, train_iters=STEPS)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    forward_step = make_sft_forward_step("mask" if packing else "causal", arch.vocab_size)
    results, widths = [], set()
    for iteration in range(STEPS):
        groups = plan.rank_micro_batches(iteration, dp_rank, dp, 1)
        micro = [collate_rows(samples, rows, data) for rows in groups]
        widths.update(batch.tokens.shape[1] for batch in micro)
        data_iter = iter(micro) if len(trainable.model) == 1 else [iter(micro) for _ in trainable.model]
        results.append(
            train_step(
                forward_step,
                data_iter,
                trainable.model,
                trainable.optimizer,
                trainable.scheduler,
                num_microbatches=len(micro),
                seq_length=data.seq_length,
                micro_batch_size=1,
            )
        )
    return {
        "loss": [r.loss for r in results],
        "grad_norm": [r.grad_norm for r in results],
        "tokens": [r.num_tokens for r in results],
        "packed": any(len(r) > 1 for r in plan.rows),
        "widths": sorted(widths),
    }


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    (result,) = run_on_ranks(
        _train, 1, setup["mcore"], setup["samples"], setup["data"], 1, 1, None, timeout_s=300
    )
    return result


@pytest.fixture(scope="module")
def reference_unpacked(setup) -> dict:
    args = (setup["mcore"], setup["samples"], setup["data"], 1, 1, None, "none", False)
    (result,) = run_on_ranks(_train, 1, *args, timeout_s=300)
    return result


LAYOUTS = {
    "tp2": (2, 1, None, 2, "none"),
    "pp2": (1, 2, None, 2, "none"),
    "pp2-vpp2": (1, 2, 2, 2, "none"),
    "dp2": (1, 1, None, 2, "none"),
    "recompute-full": (1, 1, None, 1, "full"),
}
UNPACKED_LAYOUTS = {"pp2": (1, 2, None, 2), "tp2": (2, 1, None, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(setup, reference, layout) -> None:
    tp, pp, vpp, world, recompute = LAYOUTS[layout]
    args = (setup["mcore"], setup["samples"], setup["data"], tp, pp, vpp, recompute)
    ranks = run_on_ranks(_train, world, *args, timeout_s=300)
    assert reference["packed"], "the plan should pack several samples per row"
    assert reference["loss"][-1] < reference["loss"][0]
    for rank in ranks:
        assert rank["tokens"] == reference["tokens"]
        assert rank["loss"] == pytest.approx(reference["loss"], rel=2e-6), layout
        assert rank["grad_norm"] == pytest.approx(reference["grad_norm"], rel=2e-5), layout


@pytest.mark.parametrize("layout", list(UNPACKED_LAYOUTS))
def test_unpacked_rows_of_varying_length_match_single_rank(setup, reference_unpacked, layout) -> None:
    """One sample per row, micro-batches padded to their own longest: PP exchanges shapes per micro-batch."""
    tp, pp, vpp, world = UNPACKED_LAYOUTS[layout]
    args = (setup["mcore"], setup["samples"], setup["data"], tp, pp, vpp, "none", False)
    ranks = run_on_ranks(_train, world, *args, timeout_s=300)
    assert not reference_unpacked["packed"] and len(reference_unpacked["widths"]) > 1
    for rank in ranks:
        assert rank["tokens"] == reference_unpacked["tokens"]
        assert rank["loss"] == pytest.approx(reference_unpacked["loss"], rel=2e-6), layout


def test_first_loss_is_the_completion_only_cross_entropy_of_transformers(setup, reference) -> None:
    """Step 1's loss (before any update) = token-level mean CE over the targets of its global batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_sdzero.training.sft_data import make_plan

    samples, data = setup["samples"], setup["data"]
    plan = make_plan(
        [len(ids) - 1 for ids, _ in samples],
        data,
        seed=3,
        global_batch_size=4,
        epochs=None,
        train_iters=STEPS,
    )
    model = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in plan.global_batch(0):
            for index in row:
                ids, mask = samples[index]
                logits = model(torch.tensor([ids[:-1]])).logits[0]
                targets = torch.tensor(mask[1:], dtype=torch.bool)
                losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
                total += float(losses[targets].sum())
                count += int(targets.sum())
    assert reference["tokens"][0] == count
    assert reference["loss"][0] == pytest.approx(total / count, rel=1e-5)

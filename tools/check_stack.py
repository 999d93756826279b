"""GPU check of the whole stack in ONE process: vLLM generation next to a TE FP8 Megatron step.

The design card's job holds a vLLM engine and TransformerEngine FP8 Megatron models at the same
time (vLLM's engine core runs in its child process, as in `sdzero distill`). This script does the
same on a tiny Qwen3 model made offline: it starts a vLLM engine on the
HF checkpoint and generates, runs a TE-spec Megatron model (converted from that checkpoint) through
FP8 forward + backward for each recipe asked for, then generates again with the engine still alive.

    PYTHONPATH=$PWD python3 tools/check_stack.py                  # on the GPU box
    PYTHONPATH=$PWD python3 tools/check_stack.py --dry-run        # anywhere: versions and the plan

Prints versions, one JSON line per check (ok, seconds, figures) and writes everything to --out, else
to $OUT/check_stack.json when OUT is set. Exits 1 if a check fails, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

# The distributions whose versions decide whether the stack works (the wheelhouse's overrides included).
STACK_PACKAGES = (
    "torch",
    "vllm",
    "transformer-engine",
    "transformer-engine-cu13",
    "transformer-engine-torch",
    "megatron-core",
    "nvidia-cudnn-frontend",
    "nvidia-cutlass-dsl",
    "apache-tvm-ffi",
    "flashinfer-python",
    "transformers",
)
NO_CUDA = "check_stack.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run works anywhere"
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="check_stack.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: $OUT/check_stack.json)")
    parser.add_argument(
        "--fp8-recipe",
        action="append",
        choices=FP8_RECIPES,
        default=None,
        help="repeatable (default: delayed)",
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per generation")
    parser.add_argument("--samples", type=int, default=2, help="completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion at most")
    parser.add_argument("--train-steps", type=int, default=3, help="timed FP8 steps after one warm-up step")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="let vLLM capture CUDA graphs (default: enforce_eager)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print versions and the plan; use no GPU")
    args = parser.parse_args(argv)
    args.fp8_recipe = tuple(args.fp8_recipe or ("delayed",))
    for name in ("prompts", "samples", "max_tokens", "train_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.gpu_memory_utilization < 1:
        parser.error("--gpu-memory-utilization must be in (0, 1)")
    return args


def report_path(args: argparse.Namespace, environ: dict[str, str] = os.environ) -> Path | None:
    if args.out is not None:
        return args.out
    return Path(environ["OUT"]) / "check_stack.json" if environ.get("OUT") else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in STACK_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def plan(args: argparse.Namespace) -> list[str]:
    generation = f"{args.prompts} prompts x {args.samples} samples, <= {args.max_tokens} tokens"
    return [
        "make a tiny Qwen3 HF checkpoint (bf16) and convert it to Megatron",
        f"start vLLM on it (gpu_memory_utilization {args.gpu_memory_utilization}, "
        f"{'CUDA graphs' if args.cuda_graphs else 'enforce_eager'}) and generate {generation}",
        *(
            f"TE-spec Megatron model, FP8 hybrid/{recipe}: logits vs bf16 TE, then 1 + {args.train_steps} "
            "forward + backward steps"
            for recipe in args.fp8_recipe
        ),
        f"generate {generation} again with the engine still alive",
    ]


class Checks:
    """Runs named checks, each timed, a failure recorded (not raised) so the later ones still run."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, check: Callable[[], dict]) -> dict | None:
        start = time.perf_counter()
        try:
            row = {"check": name, **check()}
        except Exception as error:  # noqa: BLE001 - reported as a failed check with its message
            row = {"check": name, "ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
        row["seconds"] = round(time.perf_counter() - start, 3)
        row.setdefault("ok", True)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row if row["ok"] else None

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows)


def generate(engine, vocab_size: int, args: argparse.Namespace) -> dict:
    import torch

    from megatron_sdzero.rollout.base import SamplingParams

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab_size, (16,), generator=generator).tolist() for _ in range(args.prompts)]
    params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=7)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    completions = [c for per_prompt in outputs for c in per_prompt]
    tokens = sum(len(c.token_ids) for c in completions)
    in_vocab = all(0 <= t < vocab_size for c in completions for t in c.token_ids)
    ok = len(completions) == args.prompts * args.samples and tokens > 0 and in_vocab
    return dict(ok=ok, completions=len(completions), tokens=tokens, tokens_per_s=round(tokens / seconds, 1))


def fp8_step(ckpt: Path, recipe: str, reference_logits, tokens, vocab: int, train_steps: int) -> dict:
    import torch
    from check_te import FP8_REL_TOL, fp8_train_step, load, logits, relative_error

    model, _ = load(ckpt, "transformer_engine", fp8="hybrid", fp8_recipe=recipe)
    error = relative_error(logits(model, tokens, vocab), reference_logits)
    fp8_train_step(model, tokens)  # warm-up: TE's FP8 metadata and kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses, finite = [], True
    for _ in range(train_steps):
        model.zero_grad(set_to_none=True)
        loss, grads_finite = fp8_train_step(model, tokens)
        losses.append(loss)
        finite &= grads_finite
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / train_steps
    ok = error < FP8_REL_TOL and finite and all(map(math.isfinite, losses))
    return dict(
        ok=ok, rel_error_vs_bf16=round(error, 4), grads_finite=finite, loss=losses[-1], ms_per_step=ms
    )


def run_stack(root: Path, args: argparse.Namespace, checks: Checks) -> None:
    import torch
    from check_te import build_pair, load, logits

    from megatron_sdzero.rollout.base import RolloutConfig
    from megatron_sdzero.runtime.distributed import ParallelConfig, init_model_parallel

    init_model_parallel(ParallelConfig())  # as the trainer does before it builds its engine
    imported = checks.run("import vllm + transformer_engine.pytorch", import_both)
    if imported is None:
        return
    hf_dir, ckpt = build_pair(root, "qwen3")
    engine_box: dict = {}

    def start_engine() -> dict:
        from megatron_sdzero.rollout.vllm_engine import VLLMEngine

        config = RolloutConfig(
            engine="vllm", gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=512,
            enforce_eager=not args.cuda_graphs, dtype="bfloat16",
        )  # fmt: skip
        engine_box["engine"] = VLLMEngine(hf_dir, config)
        return {}

    if checks.run("vLLM engine start", start_engine) is None:
        return
    engine = engine_box["engine"]
    te_bf16, meta = load(ckpt, "transformer_engine")
    vocab = meta.arch.vocab_size
    checks.run("vLLM generate", lambda: generate(engine, vocab, args))
    tokens = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0)).cuda()
    reference = logits(te_bf16, tokens, vocab)
    for recipe in args.fp8_recipe:
        checks.run(
            f"TE FP8 {recipe} forward + backward",
            lambda recipe=recipe: fp8_step(ckpt, recipe, reference, tokens, vocab, args.train_steps),
        )
    checks.run("vLLM generate after the TE steps", lambda: generate(engine, vocab, args))
    checks.run("peak GPU memory of this process", lambda: {"gib": torch.cuda.max_memory_allocated() / 2**30})


def import_both() -> dict:
    import transformer_engine.pytorch  # noqa: F401
    import vllm

    return {"pid": os.getpid(), "vllm": vllm.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = report_path(args)
    report: dict = {"versions": package_versions(), "plan": plan(args), "dry_run": args.dry_run}
    print(json.dumps({"versions": report["versions"]}))
    if args.dry_run:
        print("\n".join(f"plan: {step}" for step in report["plan"]))
        write_report(out, report)
        return 0
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    report["device"] = torch.cuda.get_device_name()
    checks = Checks()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_stack(Path(tmp), args, checks)
    report.update(checks=checks.rows, ok=checks.ok, seconds=round(time.perf_counter() - start, 1))
    print(json.dumps({"ok": checks.ok, "seconds": report["seconds"], "device": report["device"]}))
    write_report(out, report)
    return 0 if checks.ok else 1


def write_report(out: Path | None, report: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

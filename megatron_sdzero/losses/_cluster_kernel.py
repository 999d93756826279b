"""One-pass fused loss and gradient (TP = 1) on Hopper thread-block clusters, CUDA built just in time.

The Triton fused kernel reads every logit twice (statistics, then gradient): 10 bytes per logit with
bf16 student, teacher and gradient, so it cannot go under 10/6 of the memory-bandwidth floor. This
kernel (``csrc/kl_cluster.cu``) reads each logit once: a cluster of C CTAs (8 by default) owns one
row at a time and keeps it in shared memory (C x 227 KB on an H100; a 151936-wide bf16 student +
teacher row is 608 KB) while the CTAs combine their partial statistics through distributed shared
memory; then each CTA writes its slice's gradient from shared memory. Same outputs as
``_triton_kernels.fused_loss_and_grad`` (KL family and cross-entropy; JSD stays on Triton).

Selection, for every call that would use the Triton fused kernel, by ``SDZERO_KL_ONEPASS``:
``auto`` (default) and ``1`` use the cluster kernel when it qualifies (compute capability 9.x, bf16
or fp16 student and teacher of the same dtype, contiguous 16-byte aligned rows, a row that fits in
the cluster's shared memory, the extension builds); ``0`` never uses it. ``auto`` leaves the mixed
reverse/forward KL (0 < forward_weight < 1) to the Triton kernel, which is faster there (H100,
16384 x 151936: 9.2 vs 8.8 ms, x 100278: 6.5 vs 6.0 ms; whereas reverse KL takes 7.9 vs 8.8 ms and
5.7 vs 6.0 ms, cross-entropy 4.8 vs 5.7 ms and 3.8 vs 4.0 ms); ``1`` takes it too. When it does
not qualify, the call falls back to the Triton fused kernel and logs why: once per reason with
``auto``, on every fallback with ``1`` (the mixed-KL choice is not logged). ``SDZERO_KL_CLUSTER``
sets the cluster size (1-16, default 8; above 8 is non-portable).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (nvcc, ninja) into
``$TORCH_EXTENSIONS_DIR/<name>`` when that is set, else ``~/.cache/megatron_sdzero/torch_extensions``;
the name carries a hash of the sources and the torch / CUDA versions. Ranks that build at the same
time share torch's lock file in that directory: one compiles, the others wait, then all import.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from megatron_sdzero.losses._torch_kernels import GradSpec
from megatron_sdzero.losses.parallel import VocabShard

logger = logging.getLogger(__name__)

ONEPASS_ENV = "SDZERO_KL_ONEPASS"
CLUSTER_ENV = "SDZERO_KL_CLUSTER"
MODES = ("auto", "1", "0")
DEFAULT_CLUSTER = 8
MAX_CLUSTER = 16
# Mirrors shared_bytes() in kl_cluster.cu: per buffer, per tensor, ceil(ceil((width + 7) / 8) / C)
# 16-byte chunks, plus 2 partial slots and 16 warp partials of 32 bytes.
_CHUNK_ELEMENTS = 8
_RESERVED_BYTES = (2 + 16) * 32
_CTA_SYSTEM_BYTES = 1024  # shared memory the driver keeps per resident CTA (compute capability 9.x)
H100_SMEM_PER_SM = 233472  # cudaDevAttrMaxSharedMemoryPerMultiprocessor on H100 / H200 (228 KB)
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("kl_cluster.cpp", "kl_cluster.cu")
_CUDA_FLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90")

FusedKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MIXED_KL_REASON = f"the mixed reverse/forward KL stays on Triton with {ONEPASS_ENV}=auto (faster there)"


def onepass_mode() -> str:
    mode = os.environ.get(ONEPASS_ENV, "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ONEPASS_ENV} must be one of {MODES}, got {mode!r}")
    return mode


def cluster_size() -> int:
    size = int(os.environ.get(CLUSTER_ENV, str(DEFAULT_CLUSTER)))
    if not 1 <= size <= MAX_CLUSTER:
        raise ValueError(f"{CLUSTER_ENV} must lie in 1..{MAX_CLUSTER}, got {size}")
    return size


@dataclass(frozen=True)
class Plan:
    """Launch shape: CTAs per cluster and row buffers per CTA (2 = the next row loads meanwhile)."""

    cluster: int
    buffers: int
    smem_bytes: int


def shared_bytes(width: int, n_tensors: int, cluster: int, buffers: int) -> int:
    max_chunks = (width + 2 * _CHUNK_ELEMENTS - 2) // _CHUNK_ELEMENTS
    chunks_per_cta = -(-max_chunks // cluster)
    return buffers * n_tensors * chunks_per_cta * 16 + _RESERVED_BYTES


def plan_cluster(
    width: int, has_teacher: bool, cluster: int, smem_optin: int, smem_per_sm: int = H100_SMEM_PER_SM
) -> Plan | None:
    """The most row buffers (2 or 1) with which two CTAs share an SM; else the most that fit in one
    CTA's opt-in shared memory; None when one buffer does not fit.

    Two CTAs per SM beat a second buffer (H100, 16384 x 151936 reverse KL: 7.9 ms with one buffer and
    two CTAs per SM, 8.5 ms with two buffers and one CTA): the kernel is latency bound, and while one
    CTA waits at its cluster barrier or for its row, the other computes."""
    n_tensors = 2 if has_teacher else 1
    plans = [
        Plan(cluster=cluster, buffers=buffers, smem_bytes=shared_bytes(width, n_tensors, cluster, buffers))
        for buffers in (2, 1)
    ]
    plans = [plan for plan in plans if plan.smem_bytes <= smem_optin]
    for plan in plans:
        if 2 * (plan.smem_bytes + _CTA_SYSTEM_BYTES) <= smem_per_sm:
            return plan
    return plans[0] if plans else None


def max_width(has_teacher: bool, cluster: int, smem_optin: int) -> int:
    """Widest row the cluster holds (single-buffered)."""
    n_tensors = 2 if has_teacher else 1
    chunks = (smem_optin - _RESERVED_BYTES) // (16 * n_tensors) * cluster
    return max(0, chunks * _CHUNK_ELEMENTS - _CHUNK_ELEMENTS + 1)


@dataclass(frozen=True)
class Request:
    """What the selection looks at, gathered from the tensors and the device."""

    mode: str
    capability: tuple[int, int] | None  # None: not a CUDA tensor
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype | None  # None: cross-entropy
    width: int
    contiguous: bool
    aligned: bool
    smem_optin: int
    cluster: int
    smem_per_sm: int = H100_SMEM_PER_SM
    mixed_kl: bool = False  # 0 < forward_weight < 1

    @property
    def has_teacher(self) -> bool:
        return self.teacher_dtype is not None


def fallback_reason(request: Request, build_error: str | None = None) -> str | None:
    """Why the one-pass kernel cannot take this call, or None when it can."""
    if request.mode == "0":
        return f"disabled by {ONEPASS_ENV}=0"
    if request.mode == "auto" and request.mixed_kl:
        return MIXED_KL_REASON
    if request.capability is None or request.capability[0] != 9:
        return f"needs a compute capability 9.x (Hopper) GPU, got {request.capability}"
    if request.student_dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 logits, got {request.student_dtype}"
    if request.has_teacher and request.teacher_dtype != request.student_dtype:
        return (
            f"needs the teacher in the student's dtype ({request.student_dtype}), got {request.teacher_dtype}"
        )
    if not request.contiguous:
        return "needs contiguous logits"
    if not request.aligned:
        return "needs 16-byte aligned logits"
    if plan_cluster(request.width, request.has_teacher, request.cluster, request.smem_optin) is None:
        widest = max_width(request.has_teacher, request.cluster, request.smem_optin)
        return (
            f"a {request.width}-column row does not fit in the shared memory of a {request.cluster}-CTA"
            f" cluster ({request.smem_optin} bytes per CTA; at most {widest} columns)"
        )
    if build_error is not None:
        return f"the CUDA extension is unavailable: {build_error}"
    return None


@functools.cache
def _device_limits(index: int) -> tuple[tuple[int, int], int, int]:
    properties = torch.cuda.get_device_properties(index)
    return (
        (properties.major, properties.minor),
        properties.shared_memory_per_block_optin,
        properties.shared_memory_per_multiprocessor,
    )


def make_request(
    student: torch.Tensor, teacher: torch.Tensor | None, spec: GradSpec | None = None
) -> Request:
    tensors = [student] if teacher is None else [student, teacher]
    capability, smem_optin, smem_per_sm = (None, 0, 0)
    if student.is_cuda:
        capability, smem_optin, smem_per_sm = _device_limits(student.device.index)
    return Request(
        mode=onepass_mode(),
        capability=capability,
        student_dtype=student.dtype,
        teacher_dtype=None if teacher is None else teacher.dtype,
        width=student.shape[-1],
        contiguous=all(t.dim() == 2 and t.is_contiguous() for t in tensors),
        aligned=all(t.data_ptr() % 16 == 0 for t in tensors),
        smem_optin=smem_optin,
        cluster=cluster_size(),
        smem_per_sm=smem_per_sm,
        mixed_kl=spec is not None and spec.kind == "kl" and 0.0 < spec.forward_weight < 1.0,
    )


# ---------------------------------------------------------------- build


def extension_name() -> str:
    """Changes with the sources, the build flags and the torch / CUDA versions."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update((_CSRC / source).read_bytes())
    digest.update(" ".join(_CUDA_FLAGS).encode())
    digest.update(f"{torch.__version__} {torch.version.cuda}".encode())
    return f"sdzero_kl_cluster_{digest.hexdigest()[:12]}"


def build_directory(name: str) -> str | None:
    """None lets torch use $TORCH_EXTENSIONS_DIR/<name>; else a folder under ~/.cache/megatron_sdzero."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    cuda = (torch.version.cuda or "none").replace(".", "")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cu{cuda}"
    path = Path.home() / ".cache" / "megatron_sdzero" / "torch_extensions" / tag / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def missing_toolchain() -> str | None:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "nvcc not found (set CUDA_HOME)"
    home = Path(cpp_extension.CUDA_HOME)
    if not (home / "bin" / "nvcc").exists():
        return f"nvcc not found under CUDA_HOME={home}"
    if not (home / "include" / "cuda_runtime.h").exists():
        return f"CUDA headers not found under CUDA_HOME={home} (set CUDA_HOME to the toolkit)"
    return None


def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first use) and import the extension; raises when that fails."""
    from torch.utils import cpp_extension

    missing = missing_toolchain()
    if missing is not None:
        raise RuntimeError(missing)
    name = extension_name()
    return cpp_extension.load(
        name=name,
        sources=[str(_CSRC / source) for source in _SOURCES],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=list(_CUDA_FLAGS),
        build_directory=build_directory(name),
        verbose=verbose,
    )


@functools.cache
def build_status() -> tuple[ModuleType | None, str | None]:
    """(module, None) once built, or (None, one-line reason); tried once per process."""
    try:
        return load_extension(verbose=os.environ.get("SDZERO_KL_BUILD_VERBOSE") == "1"), None
    except Exception as error:  # noqa: BLE001 - any build or import failure means: use Triton
        logger.debug("kl_cluster build failed", exc_info=True)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = lines[0] if lines else type(error).__name__
        return None, f"{first} (SDZERO_KL_BUILD_VERBOSE=1 shows the compiler output)"


# ---------------------------------------------------------------- dispatch


_reported: set[str] = set()
_launch_failures: dict[Plan, str] = {}  # plans whose launch the device refused, with the reason


def _report_fallback(reason: str, mode: str) -> None:
    if mode == "0" or reason == MIXED_KL_REASON or (mode == "auto" and reason in _reported):
        return
    _reported.add(reason)
    logger.warning("one-pass cluster KL kernel not used (%s); using the Triton fused kernel", reason)


def onepass_plan(
    student: torch.Tensor, teacher: torch.Tensor | None, spec: GradSpec | None = None
) -> tuple[Plan | None, str | None]:
    """(plan, None) when the cluster kernel takes this call, else (None, reason). Builds on first use."""
    request = make_request(student, teacher, spec)
    reason = fallback_reason(request)
    if reason is None:
        reason = fallback_reason(request, build_status()[1])
    if reason is not None:
        return None, reason
    plan = plan_cluster(
        request.width, request.has_teacher, request.cluster, request.smem_optin, request.smem_per_sm
    )
    if plan in _launch_failures:
        return None, _launch_failures[plan]
    return plan, None


def select_fused_kernel(
    kernels: ModuleType, student: torch.Tensor, teacher: torch.Tensor | None, spec: GradSpec | None = None
) -> FusedKernel:
    """The cluster kernel when it takes this call, else ``kernels.fused_loss_and_grad`` (logged)."""
    plan, reason = onepass_plan(student, teacher, spec)
    if plan is None:
        _report_fallback(reason, onepass_mode())
        return kernels.fused_loss_and_grad
    return functools.partial(fused_loss_and_grad, plan=plan)


def fused_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    coef: torch.Tensor,
    target_cols: torch.Tensor | None,
    shard: VocabShard,
    inv_temp: float,
    spec: GradSpec,
    out: torch.Tensor | None = None,
    plan: Plan | None = None,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values and the gradient (into ``out`` when given, e.g. the student itself), TP = 1,
    KL family or cross-entropy; the same contract as ``_triton_kernels.fused_loss_and_grad``.

    When the device refuses the launch (checked before the kernel runs, so ``out`` is untouched),
    the plan is remembered as failed and the call goes to the Triton fused kernel, unless ``strict``.
    """
    if shard.tp_size != 1 or spec.kind not in ("kl", "ce"):
        raise ValueError("the cluster kernel covers a single process and the KL family / cross-entropy")
    if plan is None:
        plan, reason = onepass_plan(student, teacher)
        if plan is None:
            raise RuntimeError(f"the one-pass cluster kernel cannot take this call: {reason}")
    module, error = build_status()
    if module is None:
        raise RuntimeError(f"the one-pass cluster kernel is unavailable: {error}")
    n_rows = student.shape[0]
    grad = torch.empty_like(student) if out is None else out
    values = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return values, grad
    is_ce = spec.kind == "ce"
    targets = target_cols.contiguous() if is_ce else torch.empty(0, dtype=torch.int64, device=student.device)
    try:
        module.loss_and_grad(
            student, student if teacher is None else teacher, grad, values, coef.contiguous(), targets,
            shard.valid_columns, inv_temp, spec.forward_weight, is_ce, plan.cluster, plan.buffers,
        )  # fmt: skip
    except RuntimeError as error:
        if strict or isinstance(error, torch.OutOfMemoryError):
            raise
        lines = str(error).strip().splitlines()
        _launch_failures[plan] = f"launch failed: {lines[0] if lines else type(error).__name__}"
        _report_fallback(_launch_failures[plan], onepass_mode())
        from megatron_sdzero.losses import _triton_kernels

        return _triton_kernels.fused_loss_and_grad(
            student, teacher, coef, target_cols, shard, inv_temp, spec, out=out
        )
    return values, grad


def emulate_loss_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    coef: torch.Tensor,
    target_cols: torch.Tensor | None,
    shard: VocabShard,
    inv_temp: float,
    spec: GradSpec,
    cluster: int = 3,
    threads: int = 5,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's algorithm on CPU tensors, sequentially (tests): same outputs as on the GPU up
    to the order of float32 additions."""
    module, error = build_status()
    if module is None:
        raise RuntimeError(f"the kl_cluster extension is unavailable: {error}")
    is_ce = spec.kind == "ce"
    grad = torch.empty_like(student) if out is None else out
    values = torch.empty(student.shape[0], dtype=torch.float32)
    targets = target_cols.contiguous() if is_ce else torch.empty(0, dtype=torch.int64)
    module.emulate(
        student, student if teacher is None else teacher, grad, values, coef.contiguous(), targets,
        shard.valid_columns, inv_temp, spec.forward_weight, is_ce, cluster, threads,
    )  # fmt: skip
    return values, grad

"""Known, harmless third-party warnings go to the run's log file instead of the console.

Only exact, known messages are routed (Megatron deprecations for APIs we use on purpose, TE/Apex
fallback notices, torch and transformers deprecation notices); anything else still shows. With
``--verbose`` (``SDZERO_VERBOSE=1``) they show on the console too. The log file is
``SDZERO_LOG_FILE`` (set by :func:`configure` from the run directory, inherited by every rank the
command starts); messages are kept in memory until the run has created its directory (a failed
start leaves nothing behind) and written at the next message or at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import warnings
from pathlib import Path

LOG_FILE_ENV = "SDZERO_LOG_FILE"
VERBOSE_ENV = "SDZERO_VERBOSE"
LOG_NAME = "third_party.log"

# (logger name, message start): deprecation notices for APIs we use on purpose.
_LOG_MESSAGES = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),  # GPTModel still works in 0.19
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),  # we save sync
    # Megatron computes the layout itself when it is not given, as it does for every caller today.
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not"),
    # transformers' generate passes the old cache argument to its own models.
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated"),
    # Said on every machine without CUDA, often before the CPU is known to be the device here.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)

# Starts of warnings.warn messages that are known and harmless here.
_KNOWN_WARNINGS = (
    "Apex is not installed",
    "Transformer Engine and Apex are not installed",
    "absl.logging is not installed",
    "The following imports from `dynamic_context.py` will be removed",
    "Could not determine rank from torch.distributed",
    "`torch.jit.script_method` is deprecated",
    "`past_key_values` is deprecated",  # transformers cache deprecation, raised inside its own generate
    "No device id is provided via `init_process_group` or `barrier`",
    "TypedStorage is deprecated",
    "full scope is deprecated. Use empty cuda_graph_modules",  # Megatron's TransformerConfig default
    "MimoModelConfig is experimental",  # printed when megatron.core imports its models
    "Please use DTensor instead and we are deprecating ShardedTensor",  # torch, via dist_checkpointing
    "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to",  # conversion
    "The argument order of load has been changed",  # torch.distributed.checkpoint's notice
    # Megatron's distributed optimizer zeroes .grad on its fp32 shard views (non-leaf tensors); its
    # own source marks that group "throws grad-access warning" (distrib_optimizer.zero_grad)
    "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)
_KNOWN = re.compile("|".join(re.escape(m) for m in _KNOWN_WARNINGS))

_installed = False
_original_showwarning = warnings.showwarning
_pending: list[str] = []  # routed before the log file was known
_MAX_PENDING = 1000


def configure(run_dir: str | Path | None, verbose: bool) -> None:
    """Route known messages of this process (and the ranks it starts) to ``run_dir``/third_party.log."""
    if verbose and not _verbose():
        os.environ[VERBOSE_ENV] = "1"
        for text in _pending:  # routed before --verbose was read: show them now
            print(text, end="", file=sys.stderr)
    if run_dir is not None:
        os.environ[LOG_FILE_ENV] = str(Path(run_dir) / LOG_NAME)
        _flush()


def is_known_warning(message: str) -> bool:
    return _KNOWN.match(message) is not None


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _to_log_file(text: str) -> None:
    if len(_pending) < _MAX_PENDING:
        _pending.append(text if text.endswith("\n") else text + "\n")
    _flush()


def _flush() -> None:
    """Write what is pending once the run directory exists (the run creates it, never the log)."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path or not _pending or not Path(path).parent.is_dir():
        return
    try:
        with open(path, "a") as log:
            log.writelines(_pending)
        _pending.clear()
    except OSError:  # the log is a courtesy; never fail a run over it
        pass


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    if is_known_warning(str(message)):
        _to_log_file(warnings.formatwarning(message, category, filename, lineno, line))
        if not _verbose():
            return
    _original_showwarning(message, category, filename, lineno, file, line)


class _RouteMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        _to_log_file(f"{record.levelname} {record.name}: {record.getMessage()}")
        return _verbose()


def quiet_known_messages(cpu: bool) -> None:
    """Install the routing once per process (``cpu``: also the "No CUDA runtime" notice)."""
    global _installed
    if not _installed:
        _installed = True
        if not sys.stderr.isatty() and not _verbose():
            # Hugging Face's own bars (loading and writing weights) follow ours: off when not a TTY.
            # Read when huggingface_hub is imported, so set before any command imports it.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        atexit.register(_flush)
        for name, prefix in _LOG_MESSAGES:
            logging.getLogger(name).addFilter(_RouteMessage(prefix))
        warnings.showwarning = _showwarning
    if cpu and not _verbose():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"

"""Known third-party warnings go to the run's log file, not the console; --verbose shows them too."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from megatron_sdzero.runtime import quiet


@pytest.fixture
def routed(monkeypatch, tmp_path):
    for name in (quiet.LOG_FILE_ENV, quiet.VERBOSE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so teardown restores the value before the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(quiet, "_pending", [])
    # pytest records warnings itself; stand in for Python's default printer of everything else.
    to_stderr = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n))
    monkeypatch.setattr(quiet, "_original_showwarning", to_stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        quiet.quiet_known_messages(cpu=False)
        monkeypatch.setattr(warnings, "showwarning", quiet._showwarning)
        yield tmp_path / "run"


def test_known_warnings_reach_the_log_file_not_the_console(routed, capsys):
    warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning, stacklevel=1)
    quiet.configure(routed, verbose=False)  # the run directory is known only after the import-time warning
    routed.mkdir()  # ... and created by the run, not by the log
    warnings.warn("`past_key_values` is deprecated and will be removed", FutureWarning, stacklevel=1)
    logging.getLogger("megatron.core.models.gpt.gpt_model").warning("GPTModel IS DEPRECATED, use ...")
    logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME=...")
    logging.getLogger("transformers.utils.generic").warning(
        "`past_key_values`/`cache_params` are deprecated."
    )
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").warning(
        "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True."
    )
    warnings.warn("something new and unexpected", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "something new and unexpected" in err
    assert "Apex" not in err and "past_key_values" not in err and "GPTModel" not in err
    assert "full_param_layout" not in err and "cache_params" not in err and "No CUDA runtime" not in err
    log = (routed / quiet.LOG_NAME).read_text()
    assert (
        "Transformer Engine and Apex" in log and "past_key_values" in log and "GPTModel IS DEPRECATED" in log
    )
    assert "unexpected" not in log


def test_verbose_shows_them_on_the_console_too(routed, capsys):
    routed.mkdir()
    quiet.configure(routed, verbose=True)
    warnings.warn("Apex is not installed.", UserWarning, stacklevel=1)
    assert "Apex is not installed" in capsys.readouterr().err
    assert "Apex is not installed" in (routed / quiet.LOG_NAME).read_text()


def test_a_start_that_never_creates_its_run_directory_leaves_nothing(routed, capsys):
    warnings.warn("absl.logging is not installed.", UserWarning, stacklevel=1)
    quiet.configure(routed, verbose=False)
    warnings.warn("Apex is not installed.", UserWarning, stacklevel=1)
    quiet._flush()  # what exit does
    assert not routed.exists() and capsys.readouterr().err == ""
    routed.mkdir()
    quiet._flush()
    assert "absl.logging" in (routed / quiet.LOG_NAME).read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_rank_zero():
    from megatron_sdzero.runtime.progress import progress_bar

    assert progress_bar(range(3), rank=0, file=io.StringIO()).disable  # a log file or a pipe
    assert not progress_bar(range(3), rank=0, file=_Terminal()).disable
    assert progress_bar(range(3), rank=1, file=_Terminal()).disable
    assert progress_bar(range(3), rank=0, enabled=False, file=_Terminal()).disable


def test_hugging_face_progress_bars_are_off_when_not_a_tty(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    monkeypatch.setattr(quiet, "_installed", False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # what a Slurm log or a pipe looks like
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the install
    quiet.quiet_known_messages(cpu=False)
    assert quiet.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

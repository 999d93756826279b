"""tools/check_stack.py on CPU: its arguments, the dry run's report, and the refusal without CUDA.

The checks themselves need a GPU with vLLM and TransformerEngine (the GPU box runs the script).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

TOOL = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "check_stack.py"), run_name="check_stack")


def test_arguments_defaults_and_bad_values():
    args = TOOL["parse_args"]([])
    assert args.fp8_recipe == ("delayed",) and not args.cuda_graphs and not args.dry_run
    args = TOOL["parse_args"](["--fp8-recipe", "delayed", "--fp8-recipe", "tensorwise", "--max-tokens", "8"])
    assert args.fp8_recipe == ("delayed", "tensorwise") and args.max_tokens == 8
    for bad in (["--fp8-recipe", "fp4"], ["--prompts", "0"], ["--gpu-memory-utilization", "1.5"]):
        with pytest.raises(SystemExit):
            TOOL["parse_args"](bad)


def test_report_goes_to_out_or_the_out_environment_folder(tmp_path):
    args = TOOL["parse_args"]([])
    assert TOOL["report_path"](args, {}) is None
    assert TOOL["report_path"](args, {"OUT": str(tmp_path)}) == tmp_path / "check_stack.json"
    explicit = TOOL["parse_args"](["--out", str(tmp_path / "x.json")])
    assert TOOL["report_path"](explicit, {"OUT": "/elsewhere"}) == tmp_path / "x.json"


def test_dry_run_writes_versions_and_plan_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert TOOL["main"](["--dry-run", "--out", str(out), "--fp8-recipe", "blockwise"]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    assert report["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(report["versions"]) >= {"vllm", "transformer-engine", "megatron-core", "apache-tvm-ffi"}
    assert any("FP8 hybrid/blockwise" in step for step in report["plan"])
    assert "plan: start vLLM" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_clearly_without_cuda(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert TOOL["main"](["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()

"""The `orca` CLI: each subcommand imports only what it needs, and benchmarks print same-run ratios only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orca.engine.cli import main

# Run in a fresh interpreter where fastapi and uvicorn cannot be imported, as on a GPU box that has
# only torch preinstalled; `None` in sys.modules makes any import of them raise ImportError.
WITHOUT_SERVER_DEPENDENCIES = """
import sys
sys.modules["fastapi"] = None
sys.modules["uvicorn"] = None
import orca.engine.cli as cli
for argv in (["--help"], ["bench", "throughput", "--help"], ["bench", "step", "--help"], ["generate", "--help"],
             ["serve", "--help"], ["operator", "--help"]):
    try:
        cli.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
assert "torch" not in sys.modules, "building the parser imported torch"
assert not any(name.split(".")[0] in ("kopf", "kubernetes", "httpx", "transformers") for name in sys.modules)
print("ok")
"""


def test_cli_needs_no_server_dependencies_and_no_torch_for_help() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_SERVER_DEPENDENCIES], capture_output=True, text=True,
                          env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_bench_throughput_prints_only_same_run_ratios(tmp_path, capsys) -> None:
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--num-requests", "3", "--baseline-requests", "2", "--baseline-batch-size",
                 "2", "--kv-cache-memory", "256MiB", "--batch-invariant", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["requests"] for r in result["runs"]] == [3, 2, 2]
    assert result["ratio_engine_over_baseline"] == pytest.approx(
        result["runs"][1]["total_tok_s"] / result["runs"][2]["total_tok_s"])
    assert "ratio (engine/baseline, same 2 requests)" in printed
    assert "vllm" not in printed.lower() and "reference" not in result

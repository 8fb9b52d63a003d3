"""The package's layers hold: import-linter's contracts in pyproject.toml (layers, no cycles, a core free of
MLflow and Optuna), checked on the code as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_import_contract_is_kept():
    linted = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                             "sys.exit(lint_imports_command())"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "BROKEN" not in linted.stdout and linted.stdout.count("KEPT") >= 3, linted.stdout


def test_no_function_of_the_package_is_over_60_lines():
    import ast

    long = []
    for path in sorted((REPO / "fashioncnn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


@pytest.mark.slow  # a dozen processes that each load the package
def test_the_console_script_runs_the_sweep_and_every_companion_command(tmp_path):
    script = Path(sys.executable).parent / "fashioncnn"
    shown = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("fashioncnn: train small convolutional networks"), shown.stderr
    assert "--dry-run" in shown.stdout and " -m " in shown.stdout and "+study=step1-conv" in shown.stdout
    assert "\nconv: 1, 2, 3\n" in shown.stdout and "== Config ==" not in shown.stdout  # the groups, not the whole config
    from fashioncnn.cli import COMMANDS

    assert all(f"  {command} " in shown.stdout for command in COMMANDS)  # every companion command, none left out
    refused = subprocess.run([str(script), "conv=7"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: conv=7: no option '7' in config group 'conv'")

    for command in COMMANDS:
        helped = subprocess.run([str(script), command, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0 and "usage:" in helped.stdout, (command, helped.stdout, helped.stderr)
        assert "\nexample: " in helped.stdout, (command, helped.stdout)  # each shows how it is used
    described = subprocess.run([str(script), "model", "M2.3.32.64"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert described.returncode == 0 and "total parameters:" in described.stdout, described.stderr
    # The companion commands' python -m doors answer as before.
    door = subprocess.run([sys.executable, "-m", "fashioncnn.model", "M2.3.32.64"], cwd=tmp_path, capture_output=True, text=True)
    assert door.returncode == 0 and door.stdout == described.stdout
    import importlib.util

    assert [c for c in COMMANDS if importlib.util.find_spec(f"fashioncnn.{c}") is None] == []  # --help: python -m fashioncnn.COMMAND

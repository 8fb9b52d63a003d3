"""Stores written by fashioncnn 0.1 stay recognised: the same configurations keep their fingerprints.

tests/data/fingerprints-v0.1.json holds the fingerprint fashioncnn 0.1.0 computed for each job of a range
of commands (grids over every config group, the study's presets, the options beyond the study, keys that
do not change what a run learns). tests/data/store-v0.1/ is a small local store it wrote, with the
commands that wrote it: planned again against that store, they have nothing left to train.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.slow
def test_every_recorded_configuration_keeps_its_fingerprint():
    from fashioncnn.sweep.plan import fingerprint
    from fashioncnn.sweep.preflight import jobs_of

    recorded = json.loads((DATA / "fingerprints-v0.1.json").read_text())
    by_command: dict[tuple[str, ...], dict[int, str]] = {}
    for entry in recorded:
        by_command.setdefault(tuple(entry["command"]), {})[entry["job"]] = entry["fingerprint"]
    for command, expected in by_command.items():
        jobs = jobs_of(["-m", *command])
        assert {index: fingerprint(cfg) for index, (_, cfg) in enumerate(jobs)} == expected, command


@pytest.mark.slow
def test_a_store_written_by_0_1_plans_nothing_to_train(tmp_path):
    (tmp_path / "mlruns").mkdir()
    db = tmp_path / "mlruns" / "mlflow.db"
    shutil.copy(DATA / "store-v0.1" / "mlflow.db", db)
    # A newer MLflow 3.x may add to the schema; its own migration brings the store up to date, as a user would.
    subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{db}"], check=True, capture_output=True)
    for command in json.loads((DATA / "store-v0.1" / "commands.json").read_text())["commands"]:
        planned = run_cli([*command, "--dry-run"], cwd=tmp_path, timeout=300)
        assert planned.returncode == 0, planned.stderr
        assert "2 jobs: 0 to train, 0 to resume, 2 already finished" in planned.stdout, planned.stdout

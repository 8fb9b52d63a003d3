"""Team use: shared config directories with provenance, launchers, devices per job."""

import hashlib

import pytest
from conftest import local_store, run_cli, runs_of

from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.core.machine import resolve_device
from fashioncnn.core.sources import shadowed, take_config_dirs, with_search_path
from fashioncnn.sweep.preflight import jobs_of

needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
TINY = ["model.filter_in=4", "model.filter_out=4", "subset=64", "epochs=1"]


@pytest.fixture
def team_dir(tmp_path):
    team = tmp_path / "team-conf"
    (team / "conv").mkdir(parents=True)
    (team / "lr").mkdir()
    (team / "conv" / "shallow.yaml").write_text("# @package model\n# our one-block variant\nconv: 1\n")
    (team / "lr" / "0.0003.yaml").write_text("# @package optim\nlr: 0.0003\n")
    (team / "lr" / "0.01.yaml").write_text("# @package optim\nlr: 0.5\n")  # clashes with the built-in lr/0.01
    return team


def test_config_dirs_come_from_flags_and_the_environment(tmp_path, monkeypatch):
    a, b, c = (tmp_path / name for name in "abc")
    monkeypatch.setenv("FASHIONCNN_CONFIG_PATH", f"{c}")
    args, dirs = take_config_dirs(["-m", "--config-dir", str(a), "conv=2", f"-cd={b}"])
    assert args == ["-m", "conv=2"] and dirs == [a, b, c]
    assert with_search_path(["x=1"], [a]) == ["x=1", f"hydra.searchpath=['file://{a}']"]
    assert with_search_path(["hydra.searchpath=['file:///s']"], [a]) == [f"hydra.searchpath=['file:///s','file://{a}']"]


def test_team_options_compose_and_clashes_are_explained(team_dir):
    (_, first), (_, second) = jobs_of(["-m", "conv=shallow", "lr=0.0003,0.01"], [team_dir])
    assert first.model.conv == 1 and first.optim.lr == 0.0003
    assert second.optim.lr == 0.01  # the built-in lr/0.01.yaml wins over the team's
    assert shadowed([team_dir]) == [
        f"lr/0.01.yaml in {team_dir} is shadowed by lr/0.01.yaml in fashioncnn's built-in conf/ "
        "(earlier on the search path); rename yours to use it"
    ]


@pytest.mark.slow
def test_a_missing_config_dir_is_one_line(tmp_path):
    result = run_cli(["--config-dir", str(tmp_path / "nope"), "--dry-run"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: config directory {tmp_path / 'nope'} does not exist "
                                     "(from --config-dir or $FASHIONCNN_CONFIG_PATH)")


@pytest.mark.slow
@needs_data
def test_runs_record_which_source_and_version_chose_each_option(tmp_path, team_dir):
    result = run_cli(["-m", "conv=shallow", "lr=0.0003,0.01", *TINY, "experiment=team"], cwd=tmp_path,
                     env={"FASHIONCNN_CONFIG_PATH": str(team_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: lr/0.01.yaml in" in result.stderr
    runs = [r for r in runs_of(local_store(tmp_path), "team") if r.data.tags["fashioncnn.role"] == "job"]
    by_lr = {r.data.params["optim.lr"]: r.data.tags for r in runs}
    assert set(by_lr) == {"0.0003", "0.01"}
    team_file_sha = hashlib.sha256((team_dir / "lr" / "0.0003.yaml").read_bytes()).hexdigest()[:12]
    assert by_lr["0.0003"]["source.lr"] == str(team_dir) and by_lr["0.0003"]["source_sha.lr"] == team_file_sha
    assert by_lr["0.01"]["source.lr"] == "builtin"
    for tags in by_lr.values():
        assert tags["source.conv"] == str(team_dir) and tags["source.channels"] == "builtin"
        assert len(tags["source_sha.channels"]) == 12


@pytest.mark.slow
@needs_data
def test_submitit_local_sweep_keeps_parent_and_child_runs(tmp_path):
    result = run_cli(["-m", "conv=2,3", *TINY, "experiment=submitit", "hydra/launcher=submitit_local"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = runs_of(local_store(tmp_path), "submitit")
    (parent,) = [r for r in runs if r.data.tags["fashioncnn.role"] == "parent"]
    jobs = [r for r in runs if r.data.tags["fashioncnn.role"] == "job"]
    assert sorted(r.data.tags["model_name"] for r in jobs) == ["M2.2.4.4", "M3.2.4.4"]
    assert parent.info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in jobs)
    assert list((tmp_path / "multirun").glob("*/*/.submitit"))  # the jobs really went through submitit


def test_devices_per_job(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    assert [str(resolve_device("auto", job)) for job in (0, 1, 5)] == ["cuda:0", "cuda:1", "cuda:1"]
    assert str(resolve_device("auto")) == "cuda:0"
    with pytest.raises(RuntimeError, match="device=cuda:7: this machine has 4 CUDA device"):
        resolve_device("cuda:7")
    cfg = jobs_of(["device=cuda:1"])[0][1]
    assert cfg.device == "cuda:1"


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs_outside_the_repo(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fashioncnn-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(["-m", "conv=2,3", "channels=16.32", "hydra/launcher=local_parallel", "--dry-run"], cwd=elsewhere,
                     env={"PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr[-3000:]
    planned, *jobs = result.stdout.splitlines()[:3]
    assert planned.startswith(f"planned against store sqlite:///{elsewhere}") and planned.endswith("launcher local_parallel"), planned
    assert jobs == ["#0 M2.2.16.32   conv=2 channels=16.32: train", "#1 M3.2.16.32   conv=3 channels=16.32: train"]
    located = subprocess.run([sys.executable, "-c", "import fashioncnn.conf; print(fashioncnn.conf.__path__[0])"], cwd=elsewhere,
                             env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert located.stdout.strip() == str(tmp_path / "site" / "fashioncnn" / "conf")

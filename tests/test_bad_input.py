"""Bad input and bad surroundings, as a new user meets them: one clear line, exit 2, nothing created or lost."""

import gzip
import shutil
import subprocess
import sys
import time

import pytest
from conftest import free_port, run_cli, write_idx
from PIL import Image

from fashioncnn.core.data import DEBIAN_DIR, DataDamagedError, read_idx
from fashioncnn.core.loop import DivergenceGuard

needs_data = pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.slow
@needs_data
def test_a_truncated_data_file_is_named_as_damaged_before_anything_trains(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for file in DEBIAN_DIR.glob("*.gz"):
        shutil.copy(file, data)
    train_images = data / "train-images-idx3-ubyte.gz"
    train_images.write_bytes(train_images.read_bytes()[:10_000])  # cut at 10 kB, as a broken download is
    line = one_error_line(run_cli(["epochs=1"], cwd=tmp_path))
    assert line.startswith("error: data/train-images-idx3-ubyte.gz is damaged (Compressed file ended")
    assert "apt-get install --reinstall dataset-fashion-mnist" in line and "torchvision download" in line
    assert not (tmp_path / "mlruns").exists()


def test_damaged_files_name_themselves(tmp_path):
    write_idx(tmp_path / "plain", __import__("numpy").zeros((3, 28, 28), dtype="uint8"))
    (tmp_path / "plain").write_bytes((tmp_path / "plain").read_bytes()[:-10])
    with pytest.raises(DataDamagedError, match=r"plain is damaged: its header says shape \(3, 28, 28\)"):
        read_idx(tmp_path / "plain")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(bytes(range(256)) * 40)[:100])  # cut short
    with pytest.raises(DataDamagedError, match="cut.gz is damaged"):
        read_idx(tmp_path / "cut.gz")


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_in_seconds(tmp_path):
    line = one_error_line(run_cli(["tracking_uri=http://127.0.0.1:1", "data_dir=nowhere"], cwd=tmp_path, timeout=60))
    assert line.startswith("error: tracking store http://127.0.0.1:1 (experiment 'fashioncnn') cannot be used: no answer within 5 s")
    assert "Connection refused" in line


def test_cuda_without_a_gpu_is_refused_in_preflight(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error_line(run_cli(["-m", "device=cuda,cpu", "data_dir=nowhere"], cwd=tmp_path))
    assert line == "error: device=cuda: no CUDA device is available on this machine; use device=auto or device=cpu"
    assert not (tmp_path / "mlruns").exists()


def test_a_team_option_file_with_broken_yaml_is_named_with_its_line(tmp_path):
    (tmp_path / "team" / "lr").mkdir(parents=True)
    (tmp_path / "team" / "lr" / "broken.yaml").write_text("# @package optim\nlr: [0.1, 0.2\nfoo: 1\n")
    line = one_error_line(run_cli(["--config-dir", "team", "lr=broken"], cwd=tmp_path))
    assert line == (f"error: {tmp_path / 'team' / 'lr' / 'broken.yaml'}:3: broken YAML: expected ',' or ']', but got ':' "
                    "(while parsing a flow sequence)")


class Divergence:  # the divergence.* config, as the guard reads it
    enabled, chance_acc, patience, warmup_images, max_loss = True, 0.15, 3, 0, 100.0


def test_a_finite_but_huge_training_loss_stops_the_run():
    guard = DivergenceGuard(Divergence())
    assert guard.check(loss_sum=64 * 2.0, correct=40, seen=64) is None  # an ordinary window
    reason = guard.check(loss_sum=64 * 2.0 + 64 * 4.9e30, correct=80, seen=128)  # lr=1e6 did this, at 72% accuracy
    assert reason.startswith("training loss 4.9e+30 over the last 64 images, above divergence.max_loss=100")
    off = Divergence()
    off.max_loss = None
    assert DivergenceGuard(off).check(loss_sum=64 * 4.9e30, correct=50, seen=64) is None


@pytest.mark.parametrize("flag", ["--cfg", "--info", "-c"])
def test_a_show_flag_with_a_sweep_is_one_line_naming_both(flag, capsys):
    from fashioncnn import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["-m", "conv=2,3", flag, "job"] if flag != "--info" else ["-m", "conv=2,3", flag])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {flag} shows one job and cannot be combined with -m") and "\n" not in error
    assert "--dry-run" in error


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "myhost.example"])
def test_a_server_open_to_the_network_without_auth_is_refused_before_anything_listens(tmp_path, host):
    result = run_cli(["--host", host, "--backend", "sqlite", "--dir", str(tmp_path / "server")], cwd=tmp_path, module="fashioncnn.server")
    line = one_error_line(result)
    assert line.startswith(f"error: --host {host}: other machines could reach the server, and without --auth anyone could read, "
                           "change and delete every run; add --auth (or --insecure-no-auth to do it anyway)")
    assert not (tmp_path / "server").exists()  # refused before anything was made


def test_the_servers_guards_fit_the_address_it_serves():
    from fashioncnn.cluster.server import _loopback, _web_security

    assert _loopback("127.0.0.1") and _loopback("localhost") and _loopback("::1") and not _loopback("10.0.0.1")
    assert _web_security("0.0.0.0", 5000) == []  # every interface: MLflow's defaults (localhost and private networks)
    flags = dict(zip(*[iter(_web_security("10.0.0.5", 5001))] * 2))
    assert flags["--allowed-hosts"].split(",") == ["localhost", "localhost:5001", "127.0.0.1", "127.0.0.1:5001", "10.0.0.5", "10.0.0.5:5001"]
    assert flags["--cors-allowed-origins"] == "http://localhost:5001,http://127.0.0.1:5001,http://10.0.0.5:5001"


def test_a_sqlite_servers_backup_restores_its_store_and_never_over_a_server_folder(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from fashioncnn.cluster import backup

    folder = tmp_path / "server"
    folder.mkdir()
    (folder / "server.json").write_text(json.dumps({"backend": "sqlite", "postgres_port": 5433, "port": 5000}))
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.create_experiment("kept", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(experiment, tags={"model_name": "M2.2.32.32"})
    for epoch, value in ((1, 0.81), (2, 0.82)):
        client.log_metric(run.info.run_id, "val_acc", value, step=epoch)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.set_terminated(run.info.run_id, "FINISHED")
    archive = tmp_path / "team.tar.gz"
    taken = run_cli(["backup", str(archive), "--dir", str(folder)], cwd=tmp_path, module="fashioncnn.server")
    assert taken.returncode == 0, taken.stderr
    assert archive.stat().st_mode & 0o077 == 0 and not archive.with_name("team.tar.gz.partial").exists()
    assert one_error_line(run_cli(["backup", str(archive), "--dir", str(folder)], cwd=tmp_path, module="fashioncnn.server")) == (
        f"error: {archive} exists: backup writes a new file; remove it or name another")
    assert one_error_line(run_cli(["restore", str(archive), "--dir", str(folder)], cwd=tmp_path, module="fashioncnn.server")) == (
        f"error: {folder} exists and is not empty: restore makes a new server folder; give --dir a new one")
    restored = tmp_path / "restored"
    made = run_cli(["restore", str(archive), "--dir", str(restored)], cwd=tmp_path, module="fashioncnn.server")
    assert made.returncode == 0, made.stderr
    again = MlflowClient(f"sqlite:///{restored / 'mlflow.db'}").get_run(run.info.run_id)
    assert again.info.status == "FINISHED" and again.data.tags["model_name"] == "M2.2.32.32"
    assert [m.value for m in MlflowClient(f"sqlite:///{restored / 'mlflow.db'}").get_metric_history(run.info.run_id, "val_acc")] == [0.81, 0.82]
    (copy,) = restored.joinpath("artifacts").rglob("weights.txt")
    assert copy.read_text() == "weights" and restored.stat().st_mode & 0o077 == 0
    assert json.loads((restored / "server.json").read_text())["backend"] == "sqlite"
    assert json.loads(backup.tarfile.open(archive).extractfile("manifest.json").read())["format"] == backup.FORMAT


def test_the_companion_commands_against_a_server_that_does_not_answer_say_so_at_once(tmp_path):
    """MLflow's client retries a dead server for about 4 minutes; the commands ask once, briefly, and say what to do."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    Image.new("L", (28, 28)).save(tmp_path / "shirt.png")
    commands = [["links"], ["register", "fashioncnn"], ["report", "fashioncnn"], ["retrain", "fashioncnn"],
                ["predict", "models:/fashioncnn@champion", "shirt.png"]]
    started = time.monotonic()
    running = [subprocess.Popen([sys.executable, "-m", "fashioncnn", *command, "--tracking-uri", uri], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    for command, process in zip(commands, running):
        stdout, stderr = process.communicate(timeout=120)
        line = one_error_line(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
        assert line == (f"error: tracking server {uri}: no answer within 5 s ([Errno 111] Connection refused); start it "
                        "(make server), or name another store with --tracking-uri or MLFLOW_TRACKING_URI"), command
    assert time.monotonic() - started < 60

"""`make ui` serves the local store on 127.0.0.1 and prints a link that opens the runs table: a real
MLflow server process, queried over HTTP and opened in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, local_store, run_cli
from mlflow.tracking import MlflowClient

from fashioncnn.core.data import DEBIAN_DIR
from fashioncnn.tracking.links import experiment_url, experiments_url, latest_sweep_url, run_url, sweep_url, ui_base, ui_base_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def make_ui(store: Path, log: Path) -> Iterator[tuple[int, str]]:
    """Run `make ui` on a free port; yield the port and the line it announced, once the UI answers."""
    port = free_port()
    # The server's output goes to a file: it logs every request, and an unread pipe would block it.
    with log.open("w") as out:
        server = subprocess.Popen(["make", "--no-print-directory", "ui", f"PORT={port}", f"STORE={store}"], cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, announced, up = time.monotonic() + 120, "", False
        while not up:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the MLflow UI did not answer within 120 s:\n{log.read_text()}"
            announced = announced or log.read_text().partition("\n")[0]
            try:
                up = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
            except OSError:
                time.sleep(0.5)
        yield port, announced
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_make_ui_serves_the_store_on_loopback(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment_id = client.create_experiment("ui-check")
    run = client.create_run(experiment_id, run_name="M2.2.32.32")
    client.log_metric(run.info.run_id, "max_test_acc", 0.9)

    with make_ui(store, tmp_path / "ui.log") as (port, announced):
        # No sweep in the store: the link goes to the experiment of the newest run.
        assert announced.startswith(f"MLflow UI: {experiment_url(f'http://127.0.0.1:{port}', experiment_id)}  "), announced
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-check")
        body = json.load(urllib.request.urlopen(request, timeout=5))
        assert body["experiment"]["experiment_id"] == experiment_id
        # Bound to loopback only: every socket listening on the port has 127.0.0.1 as its address.
        assert listening_addresses(port) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """The IPv4 and IPv6 addresses with a socket in LISTEN state on `port`, from the kernel's tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_listening_addresses_sees_a_socket_on_every_interface():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert listening_addresses(s.getsockname()[1]) == {"0.0.0.0"}  # what the UI test must never see


def test_links(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHIONCNN_UI_URL", raising=False)
    assert ui_base() == "http://127.0.0.1:5000"
    assert ui_base_for("sqlite:///mlruns/mlflow.db") == "http://127.0.0.1:5000"
    assert ui_base_for("https://me:secret@mlflow.example.org:8443/") == "https://mlflow.example.org:8443"
    monkeypatch.setenv("FASHIONCNN_UI_URL", "https://ui.example.org/")
    assert ui_base() == ui_base_for("http://tracking:5000") == "https://ui.example.org"
    base = "http://h:1"
    assert experiment_url(base, "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    assert run_url(base, "7", "abc") == "http://h:1/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert sweep_url(base, "7", "s1").startswith(experiment_url(base, "7") + "&")

    # A store that does not exist yet: the experiment list, and the check leaves no store behind.
    missing = tmp_path / "missing" / "mlflow.db"
    assert latest_sweep_url(f"sqlite:///{missing}", base) == experiments_url(base)
    assert not missing.parent.exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert latest_sweep_url(uri, base) == experiments_url(base)  # no runs at all
    swept, other = client.create_experiment("swept"), client.create_experiment("other")
    client.create_run(swept, tags={"fashioncnn.role": "parent"})
    client.create_run(other)  # newer, but not a sweep
    assert latest_sweep_url(uri, base) == experiment_url(base, swept)


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile: the UI's saved GenAI/model-training choice lives in the
    profile, and a new one starts at MLflow's default (GenAI), as a first-time user's browser does."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--run-all-compositor-stages-before-draw", "--virtual-time-budget=20000", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def dump_dom(url: str, profile: Path, expected: list[str], *args: str) -> str:
    """The page's DOM once it shows every string in `expected` (a slow server may need a second look)."""
    for attempt in range(3):
        dom = chromium(url, profile / f"dom-{attempt}", *args, "--dump-dom").stdout
        if all(text in dom for text in expected):
            break
    return dom


# Found by dumping both views of MLflow 3.17.2: the runs table is an ARIA grid under the page title
# "Runs - Experiment N"; the GenAI overview is titled "Overview - Experiment N" and shows token and
# trace charts that say "No data available for the selected time range".
RUNS_TABLE = ['role="grid"', 'role="columnheader"', "Run Name"]
GENAI_OVERVIEW = ["Overview - Experiment", "Token Usage", "Tokens per Trace", "No data available for the selected time range"]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (make test installs it: apt-get install chromium)")
@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (CI installs it)")
def test_make_ui_link_opens_the_runs_table_in_chromium(tmp_path):
    sweep = run_cli(["-m", "conv=2,3", "subset=256", "epochs=1"], cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    client = local_store(tmp_path)
    experiment_id = client.get_experiment_by_name("fashioncnn").experiment_id
    [parent] = client.search_runs([experiment_id], "tags.`fashioncnn.role` = 'parent'")
    parent_name = html.escape(parent.info.run_name, quote=False)  # as it appears in the serialized DOM
    models = ["M2.2.32.32", "M3.2.32.32"]

    with make_ui(tmp_path / "mlruns", tmp_path / "ui.log") as (port, announced):
        base = f"http://127.0.0.1:{port}"
        url = re.match(r"MLflow UI: (\S+)  \(store: ", announced).group(1)
        assert url == experiment_url(base, experiment_id)

        table = dump_dom(url, tmp_path / "table", [*RUNS_TABLE, parent_name])
        assert "<title>Runs - Experiment" in table
        for text in [*RUNS_TABLE, parent_name]:
            assert text in table, f"{text!r} not in the page {url} opens"
        for text in GENAI_OVERVIEW:
            assert text not in table, f"{url} opens the GenAI overview ({text!r})"

        # The table nests the jobs, collapsed, under the parent; the sweep's link lists its jobs flat (not the
        # parent, which carries the sweep's best metric too and would sort among them).
        flat = sweep_url(base, experiment_id, parent.data.tags["sweep_id"])
        assert flat.startswith(url + "&")
        png = tmp_path / "runs-table.png"
        jobs = dump_dom(flat, tmp_path / "sweep", [*RUNS_TABLE, *models], "--window-size=1600,900", f"--screenshot={png}")
        for text in [*RUNS_TABLE, *models]:
            assert text in jobs, f"{text!r} not in the page {flat} opens"
        assert "Overview - Experiment" not in jobs

        page = dump_dom(run_url(base, experiment_id, parent.info.run_id), tmp_path / "run", [parent_name, "Leaderboard", *models])
        assert "Model registry" in page and "Observability" not in page, "the run page is not in the model-training view"
        for text in [parent_name, *models]:  # the parent's page lists its child runs
            assert text in page
        # Its description is the leaderboard: each model links to its run, at the address the sweep's links use
        # (ui_base(), not this UI's port; MLflow's own child-run links are relative and carry no workflowType).
        assert "<strong>Leaderboard</strong>" in page, "the parent's description is not the leaderboard"
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(child.info.run_name for child in children) == models
        for child in children:
            link = f'<a [^>]*href="{re.escape(run_url(ui_base(), experiment_id, child.info.run_id))}"[^>]*>{re.escape(child.info.run_name)}</a>'
            assert re.search(link, page), f"the leaderboard does not link {child.info.run_name} to its run"

        header = png.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", header[16:24]) == (1600, 900)
        assert png.stat().st_size > 30_000, "the screenshot looks blank"

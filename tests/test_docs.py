"""The documentation: the site builds strictly, the README stays a short front door whose links work, the
generated configuration reference names every key of the schema, and no page tells the project's history."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Words that tell how the project came to be rather than what it does.
HISTORY = re.compile(r"#\d{2,}\b|this round of work|last session|before this change|"
                     r"now \(compared to before\)", re.IGNORECASE)


def documentation() -> list[Path]:
    return [README, REPO / "mkdocs.yml", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return out


def schema_keys() -> list[str]:
    """Every key of the config schema, dotted, nodes and leaves."""
    from fashioncnn.core import config

    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls, vars(config))
        for field in dataclasses.fields(cls):
            keys.append(prefix + field.name)
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], f"{prefix}{field.name}.")

    walk(config.Config, "")
    return keys


def test_the_site_builds_strictly_with_every_page(site):
    for page in ("getting-started", "sweeps", "study", "search", "models", "team", "configuration", "speed", "design", "benchmarks"):
        assert (site / page / "index.html").exists(), page


def test_the_configuration_reference_names_every_key_of_the_schema(site):
    text = html.unescape((site / "configuration" / "index.html").read_text())
    keys = schema_keys()
    assert len(keys) > 50 and "speed.weight_first_linear" in keys
    missing = [key for key in keys if f"<code>{key}</code>" not in text]
    assert not missing, f"keys of fashioncnn/core/config.py missing from the configuration reference: {missing}"
    for group in ("conv", "lin", "channels", "lr", "optim", "prune", "+study"):
        assert f"<code>{group}</code>" in text, group


def test_the_benchmarks_page_shows_every_results_file_with_its_machine(site):
    text = html.unescape((site / "benchmarks" / "index.html").read_text())
    results = sorted((REPO / "benchmarks").glob("results*.json"))
    assert results
    for path in results:
        assert f"benchmarks/{path.name}" in text, path.name
    assert text.count("Machine:") == len(results)


def test_the_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    for needed in ("make sweep", "make test", "--dry-run", "make ui", "fashioncnn register", "fashioncnn predict",
                   "mlflow models serve -m models:/fashioncnn@champion", "did you mean", "+study=",
                   "python -m fashioncnn.server user add"):
        assert needed in text, needed


def test_the_readmes_server_figures_are_those_of_the_results_files():
    """The README quotes the load and backup benchmarks: the figures must be the results files' own."""
    text = " ".join(README.read_text().split())
    load = json.loads((REPO / "benchmarks" / "results-server-load.json").read_text())["postgres"]
    backup = json.loads((REPO / "benchmarks" / "results-backup.json").read_text())["postgres"]
    machine = load["machine"]
    assert f"{machine['cpu']}, {machine['cores']} cores" in text
    quoted = [f"{load['jobs_held_at_once']} jobs open at one time", f"p50 {load['log_batch_p50_ms']:.0f} ms",
              f"p95 {load['log_batch_p95_ms']:.0f} ms", f"{load['burst']['clients']} clients",
              f"{load['burst']['log_batch_per_second']:.0f} `log_batch`/s, p95 {load['burst']['log_batch_p95_ms']:.0f} ms",
              f"{load['server_memory_mb']['idle'] / 1024:.1f} GB idle",
              f"{max(load['server_memory_mb'].values()) / 1024:.1f} GB at most",
              f"Backup of {backup['runs']} runs ({backup['backup_mb']:.0f} MB): {backup['backup_seconds']} s, "
              f"restore {backup['restore_seconds']} s"]
    assert load["every_epoch_exactly_once"] and backup["restored_the_same"]
    for figure in quoted:
        assert figure in text, figure


def test_the_readmes_relative_links_point_at_files_that_exist():
    for readme in (README, REPO / "benchmarks" / "README.md"):
        links = re.findall(r"\]\(([^)\s]+)\)", readme.read_text())
        assert links or readme != README
        for link in links:
            if re.match(r"[a-z]+:|#", link):
                continue
            target = (readme.parent / link.split("#", 1)[0]).resolve()
            assert target.exists(), f"{readme.relative_to(REPO)} links to {link}, which does not exist"


def test_no_page_tells_the_projects_history():
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in documentation()
             for number, line in enumerate(path.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not found, found


def test_the_history_check_can_fail():
    assert HISTORY.search("done in the last session") and HISTORY.search("Before this change, runs were lost")
    assert not HISTORY.search("python -m fashioncnn -m conv=2,3")

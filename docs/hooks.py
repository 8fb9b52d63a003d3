"""MkDocs hooks: the pages that are generated at build time, so they cannot drift from the code.

- configuration.md: every key of the config schema (the dataclasses in fashioncnn/core/config.py) with its
  type, default, allowed values and description (the comment beside or above the field), and the config
  groups of conf/ with their options and the keys each option sets.
- benchmarks.md: every benchmarks/results-*.json (and results.json), with the machine it came from.

mkdocs.yml names this file under `hooks:`; `make docs` runs `mkdocs build --strict`.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

import yaml
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
BENCHMARKS = REPO / "benchmarks"
# Config groups that are presets, added with a + (python -m fashioncnn -m +study=step1-conv).
PRESET_GROUPS = ("study", "arch")

# What each benchmark script measures (its results file names the script).
SCRIPTS = {
    "results.json": ("bench.py", "Training speed: the naive reference loop against the package's loop, all cores"),
    "results-threads1.json": ("bench.py --threads 1", "Training speed: the same, both loops on one thread"),
    "results-answers.json": ("answers.py", "What a sweep's Pareto front and importance cost at its close"),
    "results-checkpoint-upload.json": ("checkpoint_upload.py", "Uploading per-epoch checkpoints to a tracking server"),
    "results-first-contact.json": ("first_contact.py", "How long a new user waits for the first answers"),
    "results-log-model.json": ("log_model_cost.py", "What logging the model costs at the end of a run"),
    "results-search.json": ("search.py", "Pruning and sampled search against the full step-3 grid"),
    "results-system-metrics.json": ("system_metrics_overhead.py", "What MLflow's system metrics cost a run"),
    "results-warm-start.json": ("warm_start.py", "A search started from known runs against one started cold"),
    "results-server-load.json": ("server_load.py", "Several sweeps at once against one tracking server"),
    "results-backup.json": ("backup_restore.py", "Backup and restore of a team server"),
    "results-accuracy.json": ("(recorded runs)", "Accuracy of the default model and of the best preset"),
    "results-speed-options.json": ("options.py (recorded)", "Each speed option switched off"),
}


def on_files(files, config):
    sys.path.insert(0, str(REPO))
    for name, text in (("configuration.md", configuration_page()), ("benchmarks.md", benchmarks_page())):
        files.append(File.generated(config, name, content=text))
    return files


# ---------------------------------------------------------------------------------------------- configuration


def schema_keys() -> list[dict[str, str]]:
    """One row per leaf key of the schema: key, type, default, allowed, description."""
    from fashioncnn.core import config as schema

    comments = _field_comments(Path(schema.__file__))
    rules = {key: allowed for key, (_, allowed) in schema._RULES.items()}
    rows: list[dict[str, str]] = []

    def walk(cls: type, prefix: str, parent_learns: str = "yes") -> None:
        hints = typing.get_type_hints(cls, vars(schema))
        for f in dataclasses.fields(cls):
            key, learns = prefix + f.name, "no" if parent_learns == "no" else _learns(f)
            kind = _unwrap(hints[f.name])
            if dataclasses.is_dataclass(kind):
                doc = kind.__doc__ or ""
                if doc.startswith(kind.__name__ + "("):  # the signature dataclasses write when there is no docstring
                    doc = ""
                rows.append({"key": key, "type": "node", "default": "", "allowed": "",
                             "description": _first_line(doc or comments.get((cls.__name__, f.name), "")), "learns": learns})
                walk(kind, key + ".", learns)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = rules.get(key, "")
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                allowed = ", ".join(f"`{member.value}`" for member in kind)
            rows.append({"key": key, "type": _type_name(hints[f.name]), "default": _yaml_value(default),
                         "allowed": allowed, "description": comments.get((cls.__name__, f.name), ""), "learns": learns})

    walk(schema.Config, "")
    return rows


def _learns(f: dataclasses.Field) -> str:
    return "no" if f.metadata.get("learns", True) is False else "yes"


def _unwrap(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _type_name(hint: typing.Any) -> str:
    inner = _unwrap(hint)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    if typing.get_origin(inner) is dict:
        name = "mapping"
    return f"{name} or null" if inner is not hint else name


def _yaml_value(value: typing.Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == {}:
        return "`{}`"
    return f"`{value}`"


def _first_line(text: str) -> str:
    return " ".join(text.strip().split("\n\n")[0].split())


def _field_comments(path: Path) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment on the field's line, else the comment lines right above it."""
    source = path.read_text()
    lines = source.splitlines()
    trailing = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and lines[token.start[0] - 1][: token.start[1]].strip():
            trailing[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            line, above = statement.lineno, []
            while lines[line - 1 - len(above) - 1].strip().startswith("#"):
                above.insert(0, lines[line - 1 - len(above) - 1].strip().lstrip("#").strip())
            text = trailing.get(line) or " ".join(above)
            found[(node.name, statement.target.id)] = text
    return found


def config_groups() -> list[dict[str, typing.Any]]:
    """The config groups of conf/: default option, options, and the keys the options set."""
    defaults = {}
    for entry in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not group.startswith("override "):
                    defaults[group] = str(option)
    groups = []
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        keys: set[str] = set()
        for option in folder.glob("*.yaml"):
            text = option.read_text()
            package = next((line.split("@package", 1)[1].strip() for line in text.splitlines() if "@package" in line), folder.name)
            if package == "_global_":
                keys |= _global_keys(yaml.safe_load(text) or {})
                continue
            keys |= {f"{package}.{key}" for key in _leaves(yaml.safe_load(text) or {})}
        groups.append({"group": folder.name, "default": defaults.get(folder.name, ""), "options": options,
                       "keys": sorted(keys), "preset": folder.name in PRESET_GROUPS})
    return groups


def _global_keys(preset: dict) -> set[str]:
    """What a preset (# @package _global_) sets: the groups it picks, its top-level keys, its grid."""
    keys = {str(entry).split("/", 1)[-1].split(":")[0].strip() + " (option)"
            for entry in preset.get("defaults", []) if isinstance(entry, dict) for entry in entry}
    keys |= {key for key in preset if key not in ("defaults", "hydra")}
    if (preset.get("hydra") or {}).get("sweeper", {}).get("params"):
        keys.add("hydra.sweeper.params (the grid)")
    return keys


def _leaves(node: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in node.items():
        if key == "defaults":
            continue
        found += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return found


def _cell(text: str) -> str:
    text = re.sub(r'\s*\(?(see )?docs/[\w.-]+(, "[^"]+")?\)?', "", str(text))  # the code's comments point at these pages
    return text.replace("|", "\\|").replace("\n", " ")


def configuration_page() -> str:
    out = ["# Configuration reference", "",
           "This page is generated when the site is built, from the config schema (the dataclasses in",
           "`fashioncnn/core/config.py`) and the option files in `conf/`. Set any key on the command line:",
           "`python -m fashioncnn epochs=10 optim.lr=0.0003`. Print the whole composed config with",
           "`python -m fashioncnn --cfg job`.", "",
           "## Config groups", "",
           "A group picks one option file from `conf/<group>/`: `python -m fashioncnn conv=3 channels=32.64`.",
           "Preset groups are added with a `+`: `python -m fashioncnn -m +study=step1-conv`.", "",
           "| group | default | options | sets |", "| --- | --- | --- | --- |"]
    for group in config_groups():
        name = f"`+{group['group']}` (preset)" if group["preset"] else f"`{group['group']}`"
        default = f"`{group['default']}`" if group["default"] else "none"
        sets = ", ".join(f"`{key}`" for key in group["keys"])
        out.append(f"| {name} | {default} | {', '.join(f'`{o}`' for o in group['options'])} | {sets} |")
    out += ["", "## Every key", "",
            "*Learns* says whether the key is part of a run's fingerprint: a key that does not change what a run",
            "learns (where it runs, how fast, where it logs) does not make a new run on a re-run.", "",
            "| key | type | default | allowed | learns | description |", "| --- | --- | --- | --- | --- | --- |"]
    for row in schema_keys():
        key = f"**`{row['key']}`**" if row["type"] == "node" else f"`{row['key']}`"
        out.append(f"| {key} | {row['type']} | {row['default']} | {_cell(row['allowed'])} | {row['learns']} | {_cell(row['description'])} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- benchmarks


def benchmarks_page() -> str:
    out = ["# Benchmarks", "",
           "Every figure the documentation relies on, generated when the site is built from the results files",
           "in `benchmarks/` (`benchmarks/README.md` says what each script measures). Each section names the",
           "machine the file came from. Run a script again on your machine to get your own figures.", ""]
    files = sorted(BENCHMARKS.glob("results*.json"), key=lambda p: (p.name != "results.json", p.name))
    for path in files:
        data = json.loads(path.read_text())
        script, what = SCRIPTS.get(path.name, ("", path.stem))
        out += [f"## {what}", "", f"File: `benchmarks/{path.name}`" + (f"; made by `python benchmarks/{script}`" if ".py" in script else ""), ""]
        out += [f"**Machine:** {_machine(data)}", ""]
        out += _speed_table(path)
        out += _render(data, skip=("machine",))
    return "\n".join(out) + "\n"


def _speed_table(path: Path) -> list[str]:
    """The readable speed table that `make bench` draws into benchmarks/README.md for this results file, if any."""
    suffix = "" if path.name == "results.json" else f" {path.stem}"
    start, end = f"<!-- speed-table{suffix} -->", f"<!-- /speed-table{suffix} -->"
    text = (BENCHMARKS / "README.md").read_text()
    if start not in text or end not in text:
        return []
    return [text.split(start, 1)[1].split(end, 1)[0].strip(), "", "All figures of the file:", ""]


def _machine(data: dict) -> str:
    machine = data.get("machine")
    if machine is None:
        return "machine not recorded"
    if isinstance(machine, dict):
        text = ", ".join(f"{k} {v}" for k, v in machine.items())
    else:
        text = str(machine)
    for key in ("date", "cores", "torch"):
        if key in data and not isinstance(data[key], (dict, list)):
            text += f", {key} {data[key]}"
    return _cell(text)


def _scalar(value: typing.Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _fmt(value: typing.Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(_scalar(v) for v in value):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, str) and len(value) > 400:
        return _cell(value[:397]) + "..."
    return _cell("" if value is None else value)


def _table(rows: dict[str, dict], label: str | None = None) -> list[str]:
    """One row per entry; long texts (the same for every row, mostly) go below the table as notes."""
    columns: list[str] = []
    notes: dict[str, None] = {}
    for row in rows.values():
        for k, v in row.items():
            if isinstance(v, str) and (len(v) > 60 or "\n" in v) and not k.startswith("command"):
                notes[f"{k}: {' '.join(v.split())[:300]}"] = None
            elif k not in columns and k != label and (_scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v))):
                columns.append(k)
    columns = [c for c in columns if not any(n.startswith(c + ": ") for n in notes)]
    out = ["| | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, row in rows.items():
        out.append(f"| {_cell(name)} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return out + [""] + [f"- {_cell(note)}" for note in notes] + ([""] if notes else [])


def _render(data: dict, skip: tuple[str, ...] = ()) -> list[str]:
    out, plain = [], {}
    for key, value in data.items():
        if key in skip or key in ("date", "cores", "torch"):
            continue
        if isinstance(value, str) and "\n" in value:
            out += [f"**{key}**", "", "```text", value.strip(), "```", ""]
        elif _scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value)):
            plain[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            label = next((k for k in ("model", "name", "variant") if k in value[0]), None)
            out += [f"**{key}**", ""] + _table({str(v.get(label, i)) if label else str(i): v for i, v in enumerate(value)}, label)
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out += [f"**{key}**", ""] + _table(value)
        elif isinstance(value, dict):
            out += [f"**{key}**", ""] + _render(value)
    if plain:
        out = ["| setting or figure | value |", "| --- | --- |"] + [f"| {_cell(k)} | {_fmt(v)} |" for k, v in plain.items()] + [""] + out
    return out

"""Where config options come from: the built-in conf/, and a team's own config directories.

A team keeps its options (conv/deep.yaml, lr/0.0003.yaml, study/ours.yaml, ...) in a directory of its
own and adds it with FASHIONCNN_CONFIG_PATH=dir[:dir...] or `--config-dir dir`. Both become entries
of Hydra's `hydra.searchpath`, after the built-in configs: on a name clash the built-in option wins
(then the first directory listed), and the command warns about every shadowed file. Each run records
which source gave each chosen option and a hash of that file (tags source.<group>, source_sha.<group>).
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Sequence

CONFIG_MODULE = "fashioncnn.conf"
CONFIG_PATH_ENV = "FASHIONCNN_CONFIG_PATH"
BUILTIN = "builtin"
_CONFIG_DIR_FLAGS = ("-cd", "--config-dir")
_SEARCHPATH = "hydra.searchpath="


def builtin_root() -> Traversable:
    return resources.files(CONFIG_MODULE)


def take_config_dirs(args: Sequence[str]) -> tuple[list[str], list[Path]]:
    """The arguments without --config-dir flags, and the team directories from the flags and the environment."""
    rest, dirs, take_next = [], [], False
    for arg in args:
        if take_next:
            dirs.append(Path(arg))
            take_next = False
        elif arg in _CONFIG_DIR_FLAGS:
            take_next = True
        elif arg.startswith(tuple(f"{flag}=" for flag in _CONFIG_DIR_FLAGS)):
            dirs.append(Path(arg.split("=", 1)[1]))
        else:
            rest.append(arg)
    dirs += [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
    return rest, [d.expanduser().resolve() for d in dirs]


def missing_dirs(dirs: Sequence[Path]) -> list[Path]:
    return [d for d in dirs if not d.is_dir()]


def broken_yaml(dirs: Sequence[Path]) -> str | None:
    """The first option file of the team directories that is not valid YAML, as `path:line: what is wrong`."""
    import yaml

    for directory in dirs:
        for path in sorted(directory.rglob("*.yaml")) if directory.is_dir() else []:
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
                problem = getattr(error, "problem", None) or str(error).splitlines()[0]
                context = getattr(error, "context", None)
                return f"{where}: broken YAML: {problem}" + (f" ({context})" if context else "")
    return None


def with_search_path(args: Sequence[str], dirs: Sequence[Path]) -> list[str]:
    """Add the directories to a hydra.searchpath=[...] override (merged into one already given)."""
    if not dirs:
        return list(args)
    entries = ",".join(f"'file://{d}'" for d in dirs)
    for index, arg in enumerate(args):
        if arg.startswith(_SEARCHPATH + "[") and arg.endswith("]"):
            inner = arg[len(_SEARCHPATH) + 1 : -1]
            return [*args[:index], f"{_SEARCHPATH}[{inner + ',' if inner else ''}{entries}]", *args[index + 1 :]]
    return [*args, f"{_SEARCHPATH}[{entries}]"]


def _groups_in(root: Traversable) -> set[str]:
    return {e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith(("_", "."))}


def group_names(dirs: Sequence[Path] = ()) -> set[str]:
    names = _groups_in(builtin_root())
    for directory in dirs:
        if directory.is_dir():
            names |= _groups_in(directory)  # type: ignore[arg-type]
    return names


def group_options(dirs: Sequence[Path] = ()) -> dict[str, list[str]]:
    """Each config group's option names, from the built-in conf/ and the team directories (what Hydra's glob sees)."""
    options: dict[str, set[str]] = {}
    roots: list[Traversable] = [builtin_root(), *(d for d in dirs if d.is_dir())]  # type: ignore[list-item]
    for root in roots:
        for path in _option_files(root):
            group, _, name = path.rpartition("/")
            options.setdefault(group, set()).add(name[: -len(".yaml")])
    return {group: sorted(names) for group, names in options.items()}


def _option_files(root: Traversable, prefix: str = "") -> set[str]:
    found = set()
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            found |= _option_files(entry, f"{prefix}{entry.name}/")
        elif prefix and entry.name.endswith(".yaml"):
            found.add(f"{prefix}{entry.name}")
    return found


def shadowed(dirs: Sequence[Path]) -> list[str]:
    """One warning per team option file that an earlier source hides."""
    seen = {path: "fashioncnn's built-in conf/" for path in _option_files(builtin_root())}
    warnings = []
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(_option_files(directory)):  # type: ignore[arg-type]
            if path in seen:
                warnings.append(f"{path} in {directory} is shadowed by {path} in {seen[path]} (earlier on the search path); rename yours to use it")
            else:
                seen[path] = str(directory)
    return warnings


def option_source(group: str, option: str, searchpath: Sequence[str]) -> tuple[str, str] | None:
    """(source, sha256 prefix) of the file that provides `group/option`, in Hydra's search order."""
    relative = f"{group}/{option}.yaml"
    roots: list[tuple[str, Traversable]] = [(BUILTIN, builtin_root())]
    for entry in searchpath:
        if entry.startswith("file://"):
            roots.append((entry[len("file://"):], Path(entry[len("file://"):])))
        elif entry.startswith("pkg://"):
            roots.append((entry, resources.files(entry[len("pkg://"):])))
    for label, root in roots:
        candidate = root.joinpath(relative)
        if candidate.is_file():
            return label, hashlib.sha256(candidate.read_bytes()).hexdigest()[:12]
    return None

"""Command-line overrides: the study's numeric config groups on Hydra's own grammar, and back to text.

The config groups conv, lin, channels and lr have options named like numbers (conf/conv/2.yaml,
conf/channels/32.64.yaml). Hydra's parser reads `conv=2` as the int 2, `channels=32.64` as a float,
and refuses a number as a group choice ("Config group override must be a string or a list"). So
every override of a config group is parsed with Hydra's OverridesParser, its values are expanded
(`range(1,4)`, `glob(*)`, `choice(...)`, `sort(...)`, `shuffle(...)`, plain `2,3`) and turned into the
group's option names, and the override is written back with those names quoted: `conv='1','2','3'`.
Everything else passes through untouched. Presets (hydra.sweeper.params), retrain and the summary
use the same functions, so nothing else quotes or unquotes by hand.
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable, Mapping, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override, Quote, QuotedString, RangeSweep, ValueType
from hydra.errors import HydraException

from fashioncnn.core.config import LEGACY_SPEED_KEYS, ConfigError

# Flags of Hydra's command line that take the next argument as their value.
FLAGS_WITH_VALUE = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun")
MULTIRUN_FLAGS = ("-m", "--multirun")
SWEEPER_OVERRIDE = "hydra/sweeper=optuna"  # a sampled search (fashioncnn.sweep.search) instead of a grid
_PLAIN = re.compile(r"^[\w.\-/:@*+]+$")  # shown without quotes


def split_flags(args: Sequence[str]) -> tuple[list[str], bool]:
    """The override arguments (Hydra's flags and their values dropped) and whether -m was given."""
    overrides, multirun, skip_next = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in MULTIRUN_FLAGS:
            multirun = True
        elif arg in FLAGS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def search_selected(args: Sequence[str]) -> bool:
    """Whether the command asks for the Optuna sweeper."""
    return SWEEPER_OVERRIDE in split_flags(args)[0]


def _parse(arg: str) -> Override | None:
    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException:
        return None  # Hydra reports it, with its own message, when it composes


def _parse_error(arg: str) -> str:
    try:
        OverridesParser.create().parse_override(arg)
    except HydraException as error:
        return str(error).splitlines()[0]
    return ""


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def sort_options(names: Iterable[str]) -> list[str]:
    """Option names in numeric order where they are numbers (2 before 10), then by name."""
    return sorted(set(names), key=lambda name: (_as_number(name) is None, _as_number(name) or 0.0, name))


def _option_name(value: Any, options: Sequence[str]) -> str:
    """The group option a parsed value names: 0.001 is the option '0.001', 1e-3 too."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        same = [option for option in options if _as_number(option) == float(value)]
        return same[0] if len(same) == 1 else str(value)
    if isinstance(value, str) and "${" not in value:
        return value
    raise ValueError(value)


def _expand(override: Override, options: Sequence[str]) -> tuple[list[str], bool] | None:
    """(option names, shuffled) of a group override, or None where it is not a plain choice of options."""
    value = override._value
    kind = override.value_type
    if kind == ValueType.ELEMENT:
        return [_option_name(value, options)], False
    if kind in (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
        assert isinstance(value, ChoiceSweep)
        return [_option_name(v, options) for v in value.list], value.shuffle
    if kind == ValueType.RANGE_SWEEP:
        assert isinstance(value, RangeSweep)
        return [_option_name(v, options) for v in value.range()], value.shuffle
    if kind == ValueType.GLOB_CHOICE_SWEEP:
        assert isinstance(value, Glob)
        return value.filter(sort_options(options)), False
    return None


def quote(name: str) -> str:
    return QuotedString(name, Quote.single).with_quotes()


def group_override(key: str, names: Sequence[str], shuffle: bool = False) -> str:
    """`key='a','b'` (or `key='a'`): option names that Hydra reads as names, never as numbers."""
    values = ",".join(quote(name) for name in names)
    return f"{key}=shuffle({values})" if shuffle else f"{key}={values}"


def rewrite(args: Sequence[str], options: Mapping[str, Sequence[str]]) -> tuple[list[str], list[str]]:
    """Group overrides as quoted option names, old speed keys under speed.; returns (arguments, notices).

    `options` maps each config group to its option names (every source on the search path). Raises
    ConfigError for a sweep that cannot name options (interval(...) on a group, an empty glob).
    """
    args, notices = rename_legacy(args)
    _refuse_split_lists(args)
    rewritten, skip_next = [], False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in FLAGS_WITH_VALUE
            rewritten.append(arg)
            continue
        override = _parse(arg)
        if override is None and arg.split("=", 1)[0].lstrip("+~").split("@", 1)[0] in options:
            raise ConfigError(f"{arg}: {_parse_error(arg)}; quote option names inside functions, e.g. glob(*,exclude='32.32')")
        if override is None or override.is_hydra_override() or override.is_delete():
            rewritten.append(arg)
            continue
        key = override.key_or_group
        if key in options:
            rewritten.append(_rewrite_group(arg, override, options[key]))
        elif key in LEGACY_SPEED_KEYS and override.package is None:
            new = arg.replace(key, LEGACY_SPEED_KEYS[key], 1)
            notices.append(f"{arg} is now spelled {new} (speed options live under speed.); the old spelling goes in the next release")
            rewritten.append(new)
        else:
            rewritten.append(arg)
    return rewritten, notices


# Groups whose options build a component (fashioncnn.core.components); `<group>.name=X` once chose one.
COMPONENT_GROUPS = ("optim", "schedule", "prune")

# The Optuna sweeper's own pruning keys of before, now the prune group's: old key -> prune key.
_SWEEPER_PRUNING = {"startup_trials": "min_siblings", "reduction_factor": "reduction_factor"}


def _refuse_split_lists(args: Sequence[str]) -> None:
    """`conv=2, 3`: the shell made two arguments of one list; say so rather than let the parser guess."""
    for arg, following in zip(args, [*args[1:], ""]):
        if "=" in arg and arg.endswith(",") and not arg.startswith("-"):
            joined = f"{arg}{following}" if following and "=" not in following and not following.startswith("-") else f"{arg[:-1]}"
            raise ConfigError(f"{arg} {following}".rstrip() + f": a space after a comma splits the list into two arguments; "
                              f"write {joined} (no space), or quote it")


def rename_legacy(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Old spellings in today's: `<component>.name=X` as the group choice `<component>=X`, the Optuna sweeper's
    pruning keys as the prune group's; returns (arguments, notices). Run before anything reads the arguments."""
    renamed, notices = [], []
    for arg in args:
        key, equals, value = arg.partition("=")
        group = key.removesuffix(".name")
        if equals and key.endswith(".name") and group in COMPONENT_GROUPS:
            new = f"{group}={value}"
            notices.append(f"{arg} is now spelled {new} ({group} is a config group of its options); the old spelling goes in the next release")
            arg = new
        renamed.append(arg)
    renamed, pruning = _legacy_pruning(renamed)
    return renamed, notices + pruning


def _legacy_pruning(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """hydra.sweeper.pruner/min_epochs/startup_trials/reduction_factor as the prune group's keys, meaning what
    they meant (the sweeper's defaults then: min_epochs=1, startup_trials=2), with a notice."""
    legacy = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if key.startswith("hydra.sweeper.") and key[len("hydra.sweeper."):] in ("pruner", "min_epochs", *_SWEEPER_PRUNING):
            legacy[key[len("hydra.sweeper."):]] = (arg, value)
    if not legacy:
        return list(args), []
    if "min_epochs" in legacy and not (legacy["min_epochs"][1].isdigit() and int(legacy["min_epochs"][1]) >= 1):
        raise ConfigError(f"{legacy['min_epochs'][0]}: must be an integer >= 1 (better spelled prune.warmup_epochs or prune.min_epoch)")
    rule = legacy["pruner"][1] if "pruner" in legacy else "none"
    rule = {"successive_halving": "asha", "sha": "asha"}.get(rule, rule)
    new = [f"prune={rule}"] if "pruner" in legacy else []
    if rule == "median":
        # min_epochs=m let Optuna judge from epoch m on: the epochs before it are the warm-up
        new += [f"prune.warmup_epochs={int(legacy['min_epochs'][1]) - 1 if 'min_epochs' in legacy else 0}",
                f"prune.min_siblings={legacy['startup_trials'][1] if 'startup_trials' in legacy else 2}"]
    elif rule == "asha":
        new += [f"prune.min_epoch={legacy['min_epochs'][1] if 'min_epochs' in legacy else 1}"]
        new += [f"prune.reduction_factor={legacy['reduction_factor'][1]}"] if "reduction_factor" in legacy else []
    old = [arg for arg, _ in legacy.values()]
    notice = (f"{' '.join(old)} is now spelled {' '.join(new) or '(nothing: no pruner chosen)'} (one set of pruning keys "
              "for grids and searches, the prune group); the old spelling goes in the next release")
    return [arg for arg in args if arg not in old] + new, [notice]


def _rewrite_group(arg: str, override: Override, options: Sequence[str]) -> str:
    key = override.key_or_group
    if override.is_interval_sweep():
        raise ConfigError(f"{arg}: interval(...) samples a range, which a grid cannot list; sample it with hydra/sweeper=optuna "
                          f"(python -m fashioncnn -m hydra/sweeper=optuna ...), or choose options of '{key}' "
                          f"({', '.join(sort_options(options))}): {key}=a,b, range(...) or glob(...)")
    try:
        expanded = _expand(override, options)
    except ValueError:
        return arg  # a list, dict or interpolation: Hydra explains what is wrong with it
    if expanded is None:
        return arg
    names, shuffle = expanded
    if not names:
        raise ConfigError(f"{arg}: matches no option of config group '{key}'; available: {', '.join(sort_options(options))}")
    if shuffle:
        random.shuffle(names)  # as Hydra's shuffle(...) would, once, here
    return group_override(override.get_key_element(), names)


def display(arg: str) -> str:
    """An override as a person types it: conv='2' -> conv=2, conv='2','3' -> conv=2,3."""
    override = _parse(arg)
    if override is None or override.value_type not in (ValueType.ELEMENT, ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP):
        return arg
    values = override._value.list if isinstance(override._value, ChoiceSweep) else [override._value]
    if all(isinstance(v, bool) for v in values):  # Hydra's job lines spell them True/False
        return f"{override.get_key_element()}={','.join(str(v).lower() for v in values)}"
    if not all(isinstance(v, (str, QuotedString)) for v in values):
        return arg
    texts = [v.text if isinstance(v, QuotedString) else v for v in values]
    if not all(_PLAIN.match(text) for text in texts):
        return arg
    return f"{override.get_key_element()}={','.join(texts)}"


def display_all(args: Sequence[str]) -> str:
    return " ".join(display(arg) for arg in args)

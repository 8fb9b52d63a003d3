"""Components built from config groups: a node with a `_target_`, built by `hydra.utils.instantiate`.

As lightning-hydra-template builds its parts: the optimizer (conf/optim), the learning-rate schedule
(conf/schedule) and the pruning rule (conf/prune) are each an option file naming what it builds, so a
team's own is a file in its config directory, not a change to the package. `build` gives a target what
the caller knows at that point (the model's parameters, the number of steps) and those of the node's keys
that the target takes: the schedule node carries every built-in schedule's options (warmup_epochs,
pct_start), and each schedule takes its own. Imports nothing heavy: a target's module loads when built.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fashioncnn.core.config import ConfigError

_NOT_ARGUMENTS = ("_target_", "name")  # what the option is, not what it is built with

# Keys a group's options all mean for their target: one set on a target that cannot take it is refused
# (optim.momentum on torch.optim.Adam), where a schedule's option for another schedule is simply not used.
OWN_KEYS = {"optim": ("momentum", "weight_decay")}


def build(group: str, node: DictConfig, **known: Any) -> Any:
    """`node`'s `_target_` built with `known`, the node's set keys (not null) that the target takes by name, and
    everything in the node's `options` (arguments only a team's own target knows)."""
    from hydra.utils import instantiate

    takes, open_ended, arguments = _arguments(group, node)
    given = {key: value for key, value in known.items() if key in takes or open_ended}
    return instantiate({"_target_": node._target_, **arguments}, **given)


def check(group: str, node: DictConfig) -> None:
    """ConfigError, in one line, for a node whose target cannot be imported or cannot take what the node gives."""
    _arguments(group, node)


def _arguments(group: str, node: DictConfig) -> tuple[Mapping[str, inspect.Parameter], bool, dict[str, Any]]:
    """The target's parameters, whether it takes any keyword, and the node's arguments for it."""
    from hydra.utils import get_object

    try:
        target = get_object(node._target_)
    except Exception as error:
        raise ConfigError(f"{group}._target_={node._target_}: cannot be imported ({str(error).splitlines()[0]})") from error
    takes = inspect.signature(target).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    content = OmegaConf.to_container(node, resolve=True)
    assert isinstance(content, dict)
    options = {key: value for key, value in content.items() if key not in _NOT_ARGUMENTS and value is not None}
    extra = options.pop("options", None) or {}  # a team's own target's further arguments, given as they are
    for key in extra:
        if key not in takes and not open_ended:
            raise ConfigError(f"{group}.options.{key}={extra[key]}: {node._target_} takes no {key}; "
                              f"it takes {', '.join(takes) or 'nothing'}")
    for key in options:
        if key not in takes and key in OWN_KEYS.get(group, ()) and not open_ended:
            raise ConfigError(f"{group}.{key}={options[key]}: {node._target_} takes no {key}; leave {group}.{key} at null")
    return takes, open_ended, {**{k: v for k, v in options.items() if k in takes or open_ended}, **extra}

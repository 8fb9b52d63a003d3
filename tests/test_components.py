"""Optimizer, schedule and pruning rule as components: option files with a `_target_`, built by instantiate."""

from __future__ import annotations

import math

import pytest
import torch

from fashioncnn.core.config import ConfigError
from fashioncnn.core.optimization import make_optimizer, make_scheduler
from fashioncnn.sweep.plan import fingerprint
from fashioncnn.sweep.preflight import jobs_of


def compose(*args, team_dirs=()):
    (job,) = jobs_of(list(args), list(team_dirs))
    return job[1]


@pytest.fixture
def team_dir(tmp_path):
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "rmsprop.yaml").write_text(
        "# @package optim\n_target_: torch.optim.RMSprop\nname: rmsprop\nmomentum: 0.5\noptions: {alpha: 0.9}\n")
    (tmp_path / "schedule").mkdir()
    (tmp_path / "schedule" / "halving.yaml").write_text(
        "# @package schedule\n_target_: torch.optim.lr_scheduler.StepLR\nname: halving\noptions: {step_size: 2, gamma: 0.5}\n")
    (tmp_path / "optim" / "typo.yaml").write_text("# @package optim\n_target_: torch.optim.RMSpro\nname: typo\n")
    return tmp_path


def test_the_built_in_optimizers_are_what_their_names_say():
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(compose("optim=sgd", "optim.lr=0.05"), model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.05
    adamw = make_optimizer(compose("optim=adamw", "optim.weight_decay=0.1"), model)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.1
    assert make_optimizer(compose(), model).defaults["weight_decay"] == 0  # null: Adam's own default


def test_a_teams_own_optimizer_and_schedule_are_option_files(team_dir):
    cfg = compose("optim=rmsprop", "schedule=halving", "optim.lr=0.01", team_dirs=[team_dir])
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.RMSprop
    assert (optimizer.defaults["lr"], optimizer.defaults["momentum"], optimizer.defaults["alpha"]) == (0.01, 0.5, 0.9)
    scheduler = make_scheduler(cfg, optimizer, steps=10)
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    # Its own name and arguments make it a configuration of its own.
    other = compose("optim=rmsprop", "schedule=halving", "optim.lr=0.01", "optim.options.alpha=0.99", team_dirs=[team_dir])
    assert len({fingerprint(cfg), fingerprint(other), fingerprint(compose("optim.lr=0.01"))}) == 3


@pytest.mark.parametrize("args,message", [
    (["optim=typo"], "optim._target_=torch.optim.RMSpro: cannot be imported"),
    (["optim=rmsprop", "+optim.options.nesterov=true"], "optim.options.nesterov=True: torch.optim.RMSprop takes no nesterov; it takes params,"),
    (["optim=adam", "optim.momentum=0.9"], "optim.momentum=0.9: not allowed with optim=adam (torch.optim.Adam has no momentum)"),
])
def test_a_component_that_cannot_be_built_is_refused_before_anything_trains(team_dir, args, message):
    with pytest.raises(ConfigError) as caught:
        compose(*args, team_dirs=[team_dir])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_schedules_follow_their_curves():
    def rates(*args, steps=10):
        cfg = compose(*args, "optim.lr=0.1", "epochs=2")
        optimizer = make_optimizer(cfg, torch.nn.Linear(3, 2))
        scheduler = make_scheduler(cfg, optimizer, steps)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        return seen

    assert rates() == [0.1] * 10
    cosine = rates("schedule=cosine")  # one of two epochs of warm-up: 5 of 10 steps
    assert cosine[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1]) and cosine[5] == pytest.approx(0.1)
    assert cosine[9] == pytest.approx(0.05 * (1 + math.cos(math.pi * 4 / 5)))
    onecycle = rates("schedule=onecycle")
    assert onecycle[0] == pytest.approx(0.1 / 25) and max(onecycle) == pytest.approx(0.1, rel=0.05) and onecycle[-1] < 0.01

"""Hydra's sweep grammar on the study's numeric config groups: range, choice, glob, sort, shuffle, from the
command line and from a preset, rewritten on Hydra's own override parser."""

import pytest
from conftest import run_cli

from fashioncnn.core.config import ConfigError
from fashioncnn.core.sources import group_options
from fashioncnn.sweep.overrides import display, display_all, rewrite, split_flags
from fashioncnn.sweep.preflight import jobs_of

OPTIONS = {"conv": ["1", "2", "3"], "lin": ["2", "3", "4"], "channels": ["16.32", "32.32", "32.64", "64.128"],
           "lr": ["0.0005", "0.001", "0.005", "0.01"], "optim": ["adam", "adamw", "sgd"],
           "schedule": ["constant", "cosine", "onecycle"], "prune": ["asha", "median", "none"]}


def models(*args):
    return sorted(f"M{c.model.conv}.{c.model.lin}.{c.model.filter_in}.{c.model.filter_out}" for _, c in jobs_of(list(args)))


def lrs(*args):
    return sorted(c.optim.lr for _, c in jobs_of(list(args)))


@pytest.mark.parametrize(
    "arg,rewritten",
    [
        ("conv=2", "conv='2'"),
        ("conv=2,3", "conv='2','3'"),
        ("conv=range(1,4)", "conv='1','2','3'"),
        ("conv=choice(1,3)", "conv='1','3'"),
        ("conv=glob(*)", "conv='1','2','3'"),
        ("conv=sort(3,1,2)", "conv='1','2','3'"),
        ("lin=range(2,5)", "lin='2','3','4'"),
        ("lin=sort(4,2,reverse=true)", "lin='4','2'"),
        ("channels=32.64", "channels='32.64'"),
        ("channels=glob(32*)", "channels='32.32','32.64'"),
        ("channels=glob(*,exclude='32.32')", "channels='16.32','32.64','64.128'"),
        ("lr=1e-3", "lr='0.001'"),  # the option whose number it is
        ("lr=0.01,0.001", "lr='0.01','0.001'"),
        ("lr=glob(0.00*)", "lr='0.0005','0.001','0.005'"),
        ("+conv@foo=2", "+conv@foo='2'"),
        ("conv='2'", "conv='2'"),
        # Not group overrides, or nothing to name: untouched.
        ("optim.lr=0.1", "optim.lr=0.1"),
        ("model.conv=range(1,3)", "model.conv=range(1,3)"),
        ("~conv", "~conv"),
        ("hydra/launcher=joblib", "hydra/launcher=joblib"),
        ("conv=${oc.env:X}", "conv=${oc.env:X}"),
    ],
)
def test_group_values_become_quoted_option_names(arg, rewritten):
    assert rewrite([arg], OPTIONS) == ([rewritten], [])


def test_flags_and_their_values_pass_through():
    args = ["-m", "-cn", "conv=2", "--config-path", "x", "conv=2"]
    assert rewrite(args, OPTIONS)[0] == ["-m", "-cn", "conv=2", "--config-path", "x", "conv='2'"]
    assert split_flags(args) == (["conv=2"], True)


def test_shuffle_keeps_the_options_in_some_order():
    (arg,), _ = rewrite(["conv=shuffle(1,2,3)"], OPTIONS)
    assert arg.startswith("conv=") and sorted(arg[5:].split(",")) == ["'1'", "'2'", "'3'"]


def test_old_speed_key_spellings_move_under_speed_with_a_notice():
    args, notices = rewrite(["threads=1", "+eval_batch_size=9", "speed.compile=true"], OPTIONS)
    assert args == ["speed.threads=1", "+speed.eval_batch_size=9", "speed.compile=true"]
    assert notices == [
        "threads=1 is now spelled speed.threads=1 (speed options live under speed.); the old spelling goes in the next release",
        "+eval_batch_size=9 is now spelled +speed.eval_batch_size=9 (speed options live under speed.); the old spelling goes in the next release",
    ]


def test_a_component_chosen_by_its_name_key_is_chosen_by_its_group_with_a_notice():
    args, notices = rewrite(["optim.name=sgd,adamw", "schedule.name=cosine", "optim.lr=0.01"], OPTIONS)
    assert args == ["optim='sgd','adamw'", "schedule='cosine'", "optim.lr=0.01"]
    assert notices[0] == ("optim.name=sgd,adamw is now spelled optim=sgd,adamw (optim is a config group of its options); "
                          "the old spelling goes in the next release")


def test_the_optuna_sweepers_old_pruning_keys_are_the_prune_groups_meaning_the_same():
    args, notices = rewrite(["-m", "hydra/sweeper=optuna", "hydra.sweeper.pruner=median", "hydra.sweeper.startup_trials=1"], OPTIONS)
    # min_epochs=1 (the old default) let Optuna judge from epoch 1: no warm-up epochs.
    assert args == ["-m", "hydra/sweeper=optuna", "prune='median'", "prune.warmup_epochs=0", "prune.min_siblings=1"]
    assert notices == ["hydra.sweeper.pruner=median hydra.sweeper.startup_trials=1 is now spelled prune=median prune.warmup_epochs=0 "
                       "prune.min_siblings=1 (one set of pruning keys for grids and searches, the prune group); the old spelling "
                       "goes in the next release"]
    args, _ = rewrite(["hydra.sweeper.pruner=successive_halving", "hydra.sweeper.min_epochs=2", "hydra.sweeper.reduction_factor=4"], OPTIONS)
    assert args == ["prune='asha'", "prune.min_epoch=2", "prune.reduction_factor=4"]
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.min_epochs=0: must be an integer >= 1"):
        rewrite(["hydra.sweeper.pruner=median", "hydra.sweeper.min_epochs=0"], OPTIONS)


@pytest.mark.parametrize(
    "arg,message",
    [
        ("conv=interval(1,3)", "conv=interval(1,3): interval(...) samples a range, which a grid cannot list; sample it with "
                               "hydra/sweeper=optuna (python -m fashioncnn -m hydra/sweeper=optuna ...), or choose options of "
                               "'conv' (1, 2, 3): conv=a,b, range(...) or glob(...)"),
        ("lr=glob(9*)", "lr=glob(9*): matches no option of config group 'lr'; available: 0.0005, 0.001, 0.005, 0.01"),
        ("channels=glob(*,exclude=32.32)", "channels=glob(*,exclude=32.32): TypeError while evaluating"),
    ],
)
def test_sweeps_that_name_no_options_are_one_line_errors(arg, message):
    with pytest.raises(ConfigError) as caught:
        rewrite([arg], OPTIONS)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_display_is_what_a_person_types():
    assert display("conv='2','3'") == "conv=2,3"
    assert display("+retrained_from='abc'") == "+retrained_from=abc"
    assert display("experiment='a b'") == "experiment='a b'"  # needs its quotes
    assert display("system_metrics=False") == "system_metrics=false"
    assert display_all(["lr='0.01'", "seed=3", "epochs=1"]) == "lr=0.01 seed=3 epochs=1"


def test_group_options_come_from_every_source(tmp_path):
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "9.yaml").write_text("# @package model\nconv: 1\n")
    assert group_options([tmp_path])["conv"] == ["1", "2", "3", "9"]


@pytest.mark.slow
def test_sweep_functions_compose_on_every_study_group():
    assert models("-m", "conv=range(1,4)") == ["M1.2.32.32", "M2.2.32.32", "M3.2.32.32"]
    assert models("-m", "conv=glob(*)", "lin=choice(2,4)") == sorted(f"M{c}.{l}.32.32" for c in (1, 2, 3) for l in (2, 4))
    assert models("-m", "lin=range(2,5)") == ["M2.2.32.32", "M2.3.32.32", "M2.4.32.32"]
    assert models("-m", "channels=glob(*)") == ["M2.2.16.32", "M2.2.32.32", "M2.2.32.64", "M2.2.64.128"]
    assert models("-m", "channels=choice(16.32,64.128)") == ["M2.2.16.32", "M2.2.64.128"]
    assert lrs("-m", "lr=glob(*)") == [0.0005, 0.001, 0.005, 0.01]
    assert lrs("-m", "lr=sort(0.01,0.0005)") == [0.0005, 0.01]
    assert [o for o, _ in jobs_of(["-m", "lr=sort(0.01,0.0005)"])] == [["lr='0.0005'"], ["lr='0.01'"]]


@pytest.mark.slow
def test_sweep_functions_in_a_preset(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "grid.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      conv: range(2,4)\n      lin: glob(*)\n      channels: choice(16.32, 32.64)\n      lr: 0.01,0.001\n")
    configs = [c for _, c in jobs_of(["-m", "+study=grid"], [tmp_path])]
    assert len(configs) == 2 * 3 * 2 * 2
    assert sorted({(c.model.conv, c.model.lin, c.model.filter_in, c.optim.lr) for c in configs}) == sorted(
        (c, l, f, lr) for c in (2, 3) for l in (2, 3, 4) for f in (16, 32) for lr in (0.01, 0.001))
    # The command line still wins over the preset's entry.
    assert {c.model.conv for _, c in jobs_of(["-m", "+study=grid", "conv=1"], [tmp_path])} == {1}


def test_team_options_join_glob(tmp_path):
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "wide.yaml").write_text("# @package model\nconv: 1\nkernel_size: 5\n")
    assert models("-m", "conv=glob(*)") == ["M1.2.32.32", "M2.2.32.32", "M3.2.32.32"]
    configs = [c for _, c in jobs_of(["-m", "conv=glob(*)"], [tmp_path])]
    assert sorted((c.model.conv, c.model.kernel_size) for c in configs) == [(1, 3), (1, 5), (2, 3), (3, 3)]


@pytest.mark.slow
def test_the_command_line_takes_sweep_functions(tmp_path):
    result = run_cli(["-m", "conv=range(1,4)", "lin=choice(2,3)", "channels=glob(64*)", "lr=sort(0.01,0.001)",
                      "threads=1", "--dry-run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "12 jobs: 12 to train, 0 to resume, 0 already finished" in lines
    assert lines[-1].startswith("estimated training time: ") and "for 12 jobs" in lines[-1]
    assert lines[0].startswith("planned against store sqlite:///") and lines[0].endswith(
        "mlruns/mlflow.db, experiment fashioncnn, launcher basic (one job after another, here)")
    assert lines[1] == "#0 M1.2.64.128  conv=1 lin=2 channels=64.128 lr=0.001 speed.threads=1: train"
    assert "notice: threads=1 is now spelled speed.threads=1" in result.stderr
    assert not (tmp_path / "mlruns").exists()  # a dry run reads the store and never creates it
    bad = run_cli(["-m", "lr=interval(0.001,0.01)"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: lr=interval(0.001,0.01): interval(...) samples a range, which a grid cannot list; sample it with "
        "hydra/sweeper=optuna (python -m fashioncnn -m hydra/sweeper=optuna ...), or choose options of 'lr' "
        "(0.0005, 0.001, 0.005, 0.01): lr=a,b, range(...) or glob(...)"]

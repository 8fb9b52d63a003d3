"""Beyond the study: norm, dropout, augmentation, schedules, label smoothing, precision=auto. Off by default."""

import logging
import math

import pytest
import torch
from test_speed import tiny_data
from torch import nn

from fashioncnn.core import loop, machine
from fashioncnn.core.data import MEAN, STD
from fashioncnn.core.loop import augment, make_scheduler, train
from fashioncnn.core.machine import precision_used, use_bf16
from fashioncnn.core.model import ModelSpec, build_model, count_parameters, run_name
from fashioncnn.core.sources import group_options
from fashioncnn.sweep.plan import fingerprint
from fashioncnn.sweep.preflight import jobs_of

CPU = torch.device("cpu")
SMALL = ["model.filter_in=8", "model.filter_out=8", "epochs=2", "device=cpu"]


def compose(*args):
    ((_, cfg),) = jobs_of(list(args))
    return cfg


def run(cfg, data=None):
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec.from_config(cfg.model))
    return [(m.train_loss, m.train_acc, m.val_acc, m.test_loss, m.test_acc) for m in train(cfg, model, data or tiny_data(), CPU).history]


def test_the_options_are_config_groups_and_off_by_default():
    options = group_options()
    assert options["norm"] == ["batch", "none"] and options["augment"] == ["flip", "flip_crop", "none"]
    assert options["schedule"] == ["constant", "cosine", "onecycle"]
    cfg = compose()
    assert (cfg.model.norm.value, cfg.model.dropout, cfg.augment.flip, cfg.augment.shift, cfg.schedule.name,
            cfg.label_smoothing) == ("none", 0.0, False, 0, "constant", 0.0)
    assert run_name(cfg) == "M2.2.32.32"
    assert str(build_model(ModelSpec.from_config(cfg.model))) == str(build_model(ModelSpec.from_name("M2.2.32.32")))


def test_names_say_which_options_a_run_used():
    cfg = compose("norm=batch", "model.dropout=0.25", "augment=flip_crop", "schedule=cosine", "label_smoothing=0.1")
    assert run_name(cfg) == "M2.2.32.32+bn+do0.25+flip+shift2+cosine+ls0.1"
    assert run_name(compose("augment=flip")) == "M2.2.32.32+flip"
    assert fingerprint(cfg) != fingerprint(compose())
    assert fingerprint(compose("augment=none", "schedule=constant", "norm=none")) == fingerprint(compose())


def test_batch_norm_after_each_conv_and_dropout_before_each_hidden_linear_layer():
    model = build_model(ModelSpec.from_config(compose("norm=batch", "model.dropout=0.5", "lin=3").model))
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten",
                     "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert count_parameters(model) == count_parameters(build_model(ModelSpec.from_name("M2.3.32.32"))) + 2 * (32 + 32)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("options", [["norm=batch", "model.dropout=0.3"], ["augment=flip_crop", "schedule=onecycle", "label_smoothing=0.1"],
                                     ["augment=flip", "schedule=cosine", "norm=batch"]])
@pytest.mark.slow
def test_same_seed_same_metrics_with_every_option(options):
    cfg = compose(*SMALL, *options)
    assert run(cfg) == run(cfg)
    assert run(cfg) != run(compose(*SMALL, *options, "seed=1"))


def test_augmentation_flips_and_shifts_and_fills_with_background():
    images = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    flipped = augment(images, flip=True, shift=0, generator=generator)
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
    shifted = augment(images, flip=False, shift=2, generator=torch.Generator().manual_seed(3))
    background = torch.tensor((0.0 - MEAN) / STD).item()  # as the float32 images hold it
    for original, out in zip(images, shifted):  # a moved copy: every kept pixel is the original's, the rest is background
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(original, (dy, dx), (-2, -1))[..., 2:-2, 2:-2], out[..., 2:-2, 2:-2])]
        assert found
        kept = set(out.flatten().tolist()) - {background}
        assert kept <= set(original.flatten().tolist())


def test_augmentation_touches_training_batches_only(monkeypatch):
    calls = []

    def counting(images, *args):
        calls.append(len(images))
        return augment(images, *args)

    monkeypatch.setattr(loop, "augment", counting)
    cfg = compose(*SMALL, "epochs=1", "augment=flip_crop", "batch_size=64")
    run(cfg, tiny_data(train_count=192, test_count=64))
    assert calls == [64, 64, 64]  # three training batches; validation and test images never pass through it


def lrs(cfg, steps):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = make_scheduler(cfg, optimizer, steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_schedules_learning_rate_curves():
    onecycle = lrs(compose("schedule=onecycle", "optim.lr=0.01", "epochs=10"), 1000)
    assert onecycle[0] == pytest.approx(0.01 / 25) and max(onecycle) == pytest.approx(0.01, rel=1e-3)
    assert abs(onecycle.index(max(onecycle)) - 300) <= 2 and onecycle[-1] < 1e-5
    cosine = lrs(compose("schedule=cosine", "optim.lr=0.01", "epochs=10"), 1000)  # warm-up: one epoch of ten
    assert cosine[0] == pytest.approx(0.01 / 100) and cosine[99] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(cosine[:99], cosine[1:100])) and all(a >= b for a, b in zip(cosine[100:], cosine[101:]))
    assert cosine[550] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 450 / 900))) and cosine[-1] < 1e-6
    assert make_scheduler(compose(), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 10) is None


def test_label_smoothing_reaches_the_training_loss_only(monkeypatch):
    seen = []
    original = torch.nn.functional.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing", 0.0))
        return original(*args, **kwargs)

    monkeypatch.setattr(loop.F, "cross_entropy", spy)
    run(compose(*SMALL, "epochs=1", "label_smoothing=0.2", "batch_size=64"), tiny_data(train_count=128))
    assert seen[:2] == [0.2, 0.2] and set(seen[2:]) == {0.0}  # two training batches, then the evaluations


def test_precision_auto_is_bf16_exactly_where_it_is_native(monkeypatch, caplog):
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="fashioncnn.core.machine"):
        assert precision_used("auto", CPU) == "fp32" and use_bf16(compose("precision=auto"), CPU) is False
    assert not caplog.records  # auto says nothing where bf16 is not native; precision=bf16 does
    assert compose().precision.value == "auto"
    fp32_machine = fingerprint(compose("device=cpu"))
    assert fp32_machine == fingerprint(compose("device=cpu", "precision=fp32"))  # the fp32 path keeps its runs
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: True)
    assert precision_used("auto", CPU) == "bf16" and use_bf16(compose("precision=auto"), CPU) is True
    assert fingerprint(compose("device=cpu")) == fingerprint(compose("device=cpu", "precision=bf16")) != fp32_machine
    assert precision_used("fp32", CPU) == "fp32"

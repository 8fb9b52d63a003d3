"""The speed options: they compose and validate, bf16 steps aside where it is not native, results stay deterministic.

Speed itself is measured by `make bench` (benchmarks/), never by a timed test.
"""

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from fashioncnn.core import machine
from fashioncnn.core.config import ConfigError, register_schema, speed_keys
from fashioncnn.core.data import FashionMNIST
from fashioncnn.core.loop import make_optimizer, train
from fashioncnn.core.machine import (
    WeightFirstLinear,
    bf16_is_native,
    relu_after_pool,
    reuse_freed_memory,
    training_network,
    use_bf16,
)
from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.sweep.preflight import jobs_of

register_schema()
CPU = torch.device("cpu")


def compose(*args):
    ((_, cfg),) = jobs_of(list(args))
    return cfg


def tiny_data(train_count=192, test_count=64, val_count=32) -> FashionMNIST:
    generator = torch.Generator().manual_seed(0)
    return FashionMNIST(
        torch.randn(train_count, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (train_count,), generator=generator),
        torch.randn(test_count, 1, 28, 28, generator=generator),
        torch.randint(0, 10, (test_count,), generator=generator),
        source=None,
        val_images=torch.randn(val_count, 1, 28, 28, generator=generator),
        val_labels=torch.randint(0, 10, (val_count,), generator=generator),
    )


def run(cfg, data=None):
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec.from_config(cfg.model))
    return [(m.train_loss, m.train_acc, m.test_loss, m.test_acc) for m in train(cfg, model, data or tiny_data(), CPU).history]


SMALL = ["model.filter_in=8", "model.filter_out=8", "epochs=2", "device=cpu"]


def test_speed_defaults():
    cfg = compose()
    speed = cfg.speed
    assert (cfg.precision.value, speed.channels_last, speed.compile, speed.threads, speed.eval_batch_size) == ("auto", True, False, 0, 1000)
    assert (speed.optimizer_impl.value, speed.reuse_memory, speed.pool_before_relu, speed.weight_first_linear) == ("fused", True, True, 1_000_000)


def test_speed_options_compose_together():
    cfg = compose("precision=bf16", "speed.channels_last=false", "speed.compile=true", "speed.threads=1", "speed.eval_batch_size=250",
                  "speed.optimizer_impl=loop", "speed.reuse_memory=false", "speed.pool_before_relu=false", "speed.weight_first_linear=null")
    speed = cfg.speed
    assert (cfg.precision.value, speed.channels_last, speed.compile, speed.threads, speed.eval_batch_size) == ("bf16", False, True, 1, 250)
    assert (speed.optimizer_impl.value, speed.reuse_memory, speed.pool_before_relu, speed.weight_first_linear) == ("loop", False, False, None)


def test_old_spellings_of_speed_keys_still_compose():
    # Before 0.2 they were top-level keys; the command line moves them under speed. (and says so, see test_overrides)
    cfg = compose("threads=1", "channels_last=false", "weight_first_linear=null")
    assert (cfg.speed.threads, cfg.speed.channels_last, cfg.speed.weight_first_linear) == (1, False, None)


@pytest.mark.parametrize(
    "arg,message",
    [
        ("precision=fp16", "precision=fp16: Invalid value 'fp16', expected one of [auto, fp32, bf16]"),
        ("speed.optimizer_impl=fast", "speed.optimizer_impl=fast: Invalid value 'fast', expected one of [fused, foreach, loop]"),
        ("speed.channels_last=maybe", "speed.channels_last=maybe: Value 'maybe' is not a valid bool"),
        ("speed.threads=-1", "speed.threads=-1: not allowed, must be an integer >= 0 (0: torch's default)"),
        ("speed.eval_batch_size=0", "speed.eval_batch_size=0: not allowed, must be an integer >= 1"),
        ("speed.weight_first_linear=-5", "speed.weight_first_linear=-5: not allowed, must be null (off) or an integer >= 0"),
        ("speed.weight_first_linear=big", "speed.weight_first_linear=big: Value 'big' of type 'str' could not be converted to Integer"),
    ],
)
def test_bad_speed_options_fail_in_one_line(arg, message):
    with pytest.raises(ConfigError) as caught:
        compose(arg)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_impl_picks_the_kernel(impl, name):
    optimizer = make_optimizer(compose(f"speed.optimizer_impl={impl}", f"optim={name}"), torch.nn.Linear(3, 2))
    assert type(optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[name]
    assert bool(optimizer.defaults["fused"]) == (impl == "fused")
    assert bool(optimizer.defaults["foreach"]) == (impl == "foreach")


def test_bf16_is_native_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert not bf16_is_native(CPU, str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert bf16_is_native(CPU, str(cpuinfo))
    cpuinfo.write_text("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert bf16_is_native(CPU, str(cpuinfo))
    assert not bf16_is_native(CPU, str(tmp_path / "missing"))


def test_bf16_turns_itself_off_with_one_line_where_not_native(monkeypatch, caplog):
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="fashioncnn.core.machine"):
        assert use_bf16(compose("precision=bf16"), CPU) is False
    (record,) = caplog.records
    assert record.getMessage() == "precision=bf16: no native bf16 on this cpu (emulated bf16 is slower than fp32), training in fp32"
    caplog.clear()
    assert use_bf16(compose("precision=fp32"), CPU) is False and not caplog.records
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: True)
    assert use_bf16(compose("precision=bf16"), CPU) is True and not caplog.records


def test_bf16_fallback_trains_exactly_as_fp32(monkeypatch):
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: False)
    assert run(compose(*SMALL, "precision=bf16")) == run(compose(*SMALL, "precision=fp32"))


def test_bf16_where_native_trains_under_autocast(monkeypatch):
    # Pretend the CPU has native bf16: autocast is on, so the numbers differ from fp32 (and still learn).
    monkeypatch.setattr(machine, "bf16_is_native", lambda device: True)
    bf16 = run(compose(*SMALL, "precision=bf16", "epochs=1"))
    assert bf16 != run(compose(*SMALL, "precision=fp32", "epochs=1"))
    assert all(0 <= acc <= 1 for _, acc, _, test_acc in bf16 for acc in (acc, test_acc))


@pytest.mark.parametrize(
    "options",
    [
        [],  # the defaults
        ["speed.channels_last=false", "speed.optimizer_impl=foreach", "speed.reuse_memory=false", "speed.eval_batch_size=7"],
        ["speed.optimizer_impl=loop", "speed.pool_before_relu=false"],
        ["weight_first_linear=0"],  # every linear layer as W·xᵀ
    ],
)
def test_same_seed_same_metrics_with_speed_options(options):
    first, second = run(compose(*SMALL, *options)), run(compose(*SMALL, *options))
    assert first == second


@pytest.mark.slow
def test_relu_after_pool_is_the_same_network_bit_for_bit():
    data = tiny_data(train_count=256)
    for conv in (1, 2, 3):
        options = [*SMALL, f"model.conv={conv}"]
        assert run(compose(*options, "pool_before_relu=true"), data) == run(compose(*options, "pool_before_relu=false"), data)


def test_relu_after_pool_reorders_only_the_training_view():
    model = build_model(ModelSpec.from_name("M2.2.32.32"))
    layout = [type(layer).__name__ for layer in model]
    view = relu_after_pool(model)
    assert [type(layer).__name__ for layer in view] == [
        "Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    assert [type(layer).__name__ for layer in model] == layout  # the study's layout stays for printing and state_dict
    assert all(a is b for a, b in zip(model.parameters(), view.parameters()))
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), view(x))


def test_weight_first_linear_wraps_only_the_large_layers_and_keeps_the_function():
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_name("M1.3.32.32"))  # linear layers of 19.7M, 4.9M and 15,680 weights
    network = training_network(compose("weight_first_linear=1000000"), model, CPU)
    assert [type(layer).__name__ for layer in network if "Linear" in type(layer).__name__] == [
        "WeightFirstLinear", "WeightFirstLinear", "Linear"]
    assert list(map(id, network.parameters())) == list(map(id, model.parameters()))  # the same parameters, not copies
    assert [type(layer).__name__ for layer in model][-1] == "Linear"  # the study's layout stays for state_dict
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    expected = relu_after_pool(model)(x)
    torch.nn.functional.cross_entropy(expected, y).backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = network(x)
    torch.nn.functional.cross_entropy(got, y).backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip([p.grad for p in model.parameters()], expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert not any(isinstance(layer, WeightFirstLinear) for layer in training_network(compose("weight_first_linear=null"), model, CPU))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64, 300), (4, 16, 300)])
def test_weight_first_linear_computes_w_times_x_transposed(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(300, 200, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    out = WeightFirstLinear(linear)(x)
    # the product is W @ xᵀ, transposed back (then reshaped to x's leading dimensions), not nn.Linear's x @ Wᵀ
    chain, node = [], out.grad_fn
    while node is not None:
        chain.append(node.name())
        node = node.next_functions[0][0] if node.next_functions else None
    assert chain[1:3] == ["TBackward0", "AddmmBackward0" if bias else "MmBackward0"], chain
    expected_out = linear(x)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected_out)
    got = torch.autograd.grad(out, [x, *linear.parameters()], grad)
    expected = torch.autograd.grad(expected_out, [x, *linear.parameters()], grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_weight_first_linear_trains_to_the_same_metrics_up_to_rounding():
    data = tiny_data(train_count=256)
    every_layer = run(compose(*SMALL, "weight_first_linear=0"), data)
    none = run(compose(*SMALL, "weight_first_linear=null"), data)
    assert every_layer != [] and len(every_layer) == len(none)
    for (train_loss, train_acc, test_loss, test_acc), expected in zip(every_layer, none):
        assert (train_loss, test_loss) == pytest.approx((expected[0], expected[2]), rel=1e-3)
        # float rounding may flip a borderline prediction: allow two of the 64 test images
        assert (train_acc, test_acc) == pytest.approx((expected[1], expected[3]), abs=2 / 64)


@pytest.mark.slow
def test_bench_times_the_naive_loop_in_a_process_of_its_own(tiny_dataset, monkeypatch):
    # The naive reference must run as a user's script runs: its own process, none of the package's
    # process-wide settings (reuse_memory's malloc setting, made here as train() makes it).
    import os
    import shutil

    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the spawned worker imports bench by name
    import bench

    reuse_freed_memory()
    root = bench.torchvision_root(str(tiny_dataset))
    naive = bench.NaiveProcess("M3.3.32.32", root, seed=0, device=CPU, threads=1)
    try:
        # spawned, not forked: a forked child would inherit this process's malloc setting
        assert type(naive.process).__name__ == "SpawnProcess" and naive.process.pid != os.getpid()
        images, seconds, others_cores, faults_per_step = naive.run(2)  # 60 training images: one batch, then the loader restarts
        assert images == 120 and seconds > 0 and others_cores >= 0 and faults_per_step >= 0
        assert naive.evaluate() > 0
    finally:
        naive.close()
        shutil.rmtree(root)
    assert not naive.process.is_alive()


def test_eval_batch_size_does_not_change_the_metrics_beyond_rounding():
    data = tiny_data()
    whole, in_sevens = run(compose(*SMALL, "epochs=1"), data), run(compose(*SMALL, "epochs=1", "speed.eval_batch_size=7"), data)
    assert whole[0][:2] == in_sevens[0][:2]  # training is untouched
    assert whole[0][2] == pytest.approx(in_sevens[0][2], rel=1e-5) and whole[0][3] == in_sevens[0][3]


def test_options_change_nothing_but_speed():
    # channels_last and the optimizer kernel change rounding only: same data, same model, nearly the same numbers.
    data = tiny_data(train_count=512)
    base = run(compose(*SMALL, "speed.channels_last=false", "speed.optimizer_impl=foreach"), data)
    fast = run(compose(*SMALL), data)
    for a, b in zip(base, fast):
        assert a[0] == pytest.approx(b[0], rel=1e-3) and a[2] == pytest.approx(b[2], rel=1e-3)


def test_reuse_freed_memory_sets_glibcs_thresholds_and_steps_aside_without_glibc(monkeypatch):
    import ctypes

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert reuse_freed_memory() is True
    assert calls == [(-3, 1 << 30), (-1, 1 << 30)]  # M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB

    def no_glibc(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    assert reuse_freed_memory() is False


def test_speed_keys_are_one_node_of_the_schema_and_stay_out_of_the_fingerprint():
    from fashioncnn.sweep.plan import fingerprint

    cfg = compose()
    assert set(speed_keys()) == {f"speed.{key}" for key in OmegaConf.to_container(cfg.speed)}
    assert "speed.threads" in speed_keys() and "precision" not in speed_keys()
    assert fingerprint(compose("speed.threads=1", "speed.channels_last=false", "device=cpu")) == fingerprint(cfg)
    assert fingerprint(compose("precision=bf16")) != fingerprint(compose("precision=fp32")) != fingerprint(compose("precision=fp32", "seed=1"))


def _bench_module():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("results_name", ["results.json", "results-threads1.json"])
def test_readme_speed_tables_are_drawn_from_the_results_files(results_name):
    import json

    bench = _bench_module()
    results_file = bench.REPO / "benchmarks" / results_name
    start, end = bench.table_markers(results_file)
    readme = bench.README.read_text()
    assert f"{start}\n{bench.render_table(json.loads(results_file.read_text()))}\n{end}" in readme


def test_bench_rewrites_only_its_marked_section(tmp_path):
    import json

    bench = _bench_module()
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- speed-table -->\nold table\n<!-- /speed-table -->\nafter\n")
    results = json.loads((bench.REPO / "benchmarks" / "results.json").read_text())
    assert bench.write_readme(results, bench.RESULTS, readme)
    text = readme.read_text()
    assert text.startswith("before\n<!-- speed-table -->\n`make bench` on ") and text.endswith("<!-- /speed-table -->\nafter\n")
    assert "old table" not in text and "| M2.2.32.32 |" in text
    assert not bench.write_readme(results, tmp_path / "results-other.json", readme)  # no markers for it: left alone


def test_bench_times_bf16_too_exactly_where_it_is_native(monkeypatch, tmp_path):
    bench = _bench_module()
    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in (("avx2 avx512f", ["fp32"]), ("avx2 avx512f avx512_bf16", ["fp32", "bf16"]), ("amx_bf16", ["fp32", "bf16"])):
        cpuinfo.write_text(f"flags\t\t: fpu {flags}\n")
        monkeypatch.setattr(bench, "bf16_is_native", lambda device, path=str(cpuinfo): bf16_is_native(device, path))
        assert bench.bench_precisions(CPU) == expected
    results = json.loads((bench.REPO / "benchmarks" / "results.json").read_text())
    results["models"] = [results["models"][0], results["models"][0] | {"precision": "bf16"}]
    assert [line.split(" |")[0] for line in bench.render_table(results).splitlines()[-2:]] == ["| M2.2.32.32", "| M2.2.32.32 bf16"]

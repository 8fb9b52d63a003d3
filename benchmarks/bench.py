"""`make bench`: the naive reference loop against the package's own training path, in one run.

For each model (M2.2.32.32, M3.3.32.32, M1.3.32.32 by default):
- naive: torchvision's FashionMNIST with transforms.ToTensor(), DataLoader(batch_size=64, shuffle=True),
  torch.optim.Adam with its defaults, fp32, a tutorial's loop (batch to the device, zero_grad, forward,
  loss, backward, step, loss.item()), with torch's default thread count;
- package: fashioncnn.core.loop.train() itself, with the package's default config (plus any --set overrides).
Both start from the same initial weights. The package trains one run of short epochs of `steps`
batches; after every epoch its on_epoch callback has the naive loop run `steps` batches, so the two
alternate, never running at the same time. The first round is the warm-up. Images/s is taken per
chunk; the table shows the medians and the median of the per-round ratios.

The naive loop runs in a worker process the script spawns (a fresh interpreter), the package's path in
the script's own process. A tutorial's loop is its own process with glibc's default malloc, which hands
every freed block over its dynamic mmap threshold back to the kernel and page-faults it in again on
the next step (measured here: 4,457 faults and 14% of the CPU time in the kernel per M2.2.32.32 step,
69,244 and 28% per M1.3.32.32 step). The package's reuse_memory changes malloc for its whole process, so
in one process the naive loop would inherit it and be timed faster than any user runs it.

Other processes: on a shared machine two threads on two cores wait for each other whenever another
process takes a core, and a round can slow down 5x. The CPU time other processes used is measured
for each chunk (/proc/stat minus the measuring process); a round is quiet when they kept fewer than --quiet
cores of the loops' cores busy. Rounds go on until --rounds quiet ones are in (or --max-minutes per
model have passed: then all rounds count and the table says so). Each process measures its own
chunks, and its minor page faults per step, which results.json keeps; the script's process waits on
a pipe while the worker runs. benchmarks/options.py measures one package option against another.

The package's "epoch" here holds `steps` batches and its test pass 64 images, so its time is training
steps (plus a few ms). Full-epoch seconds (train + test) are estimated as 60,000 / images/s plus a
measured pass over the 10,000 test images (best of two; the package's evaluate() with its defaults, the
naive loop's test DataLoader at batch 64 under no_grad); `--full-epoch` also times one real package epoch.

GFLOP/s: conv and matmul FLOPs of one training step (forward + backward, counted by torch's
FlopCounterMode) times images/s, as a fraction of the fp32 and bf16 matmul peaks measured in the same
run (square torch.mm with all cores, the best of repeats at the start and at the end).

Writes benchmarks/results.json (--out) and redraws the table between the matching speed-table markers
in benchmarks/README.md; `python benchmarks/bench.py --readme-only [--out FILE]` redraws it from an existing file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fashioncnn.core.config import register_schema, speed_keys
from fashioncnn.core.data import FILES, FashionMNIST, load, locate
from fashioncnn.core.loop import EpochMetrics, evaluate, train
from fashioncnn.core.machine import bf16_is_native, resolve_device, training_network, use_bf16
from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.sweep.preflight import jobs_of

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results.json"
README = REPO / "benchmarks" / "README.md"  # the speed tables live beside the results files
MODELS = ["M2.2.32.32", "M3.3.32.32", "M1.3.32.32"]
BATCH = 64  # the study's batch size, for both loops
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000


# ---------------------------------------------------------------------------------------------- machine

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_is_native(device),
        "device": str(device),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def page_faults() -> int:
    """Minor page faults of this process so far: memory the kernel had to map (and zero) on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_snapshot() -> tuple[float, float, float]:
    """(CPU seconds busy on the whole machine, CPU seconds used by this process, wall clock)."""
    busy = 0.0
    try:
        with open("/proc/stat") as stat:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime, time.perf_counter()


def foreign_load(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes (or taken by the hypervisor) between two snapshots."""
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]))


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 2.5) -> float:
    """Best GFLOP/s of a square matmul; n doubles until one product takes 50 ms (up to 4096)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 512
    while True:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b
        sync()
        started = time.perf_counter()
        a @ b
        sync()
        if time.perf_counter() - started > 0.05 or n >= 4096:
            break
        n *= 2
    best, deadline, reps = float("inf"), time.perf_counter() + seconds, 0
    while reps < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        sync()
        best, reps = min(best, time.perf_counter() - started), reps + 1
    return 2 * n**3 / best / 1e9


def train_flops_per_image(spec: ModelSpec) -> float:
    """Conv and matmul FLOPs of one training step (forward + backward), per image."""
    model = build_model(spec)
    x, y = torch.zeros(BATCH, 1, 28, 28), torch.zeros(BATCH, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / BATCH


# ------------------------------------------------------------------------------------------ naive loop

def torchvision_root(data_dir: str) -> Path:
    """A temporary root with FashionMNIST/raw/ holding the four files uncompressed, as torchvision expects.

    The files are the ones the package itself finds (./data, Debian's package, ...), so torchvision
    never needs to download.
    """
    root = Path(tempfile.mkdtemp(prefix="fashioncnn-bench-"))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for key, path in locate(data_dir, download=False).items():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as source, open(raw / FILES[key], "wb") as target:
            shutil.copyfileobj(source, target)
    return root


class NaiveLoop:
    """The reference: what a tutorial writes for Fashion-MNIST."""

    def __init__(self, spec: ModelSpec, root: Path, seed: int, device: torch.device):
        from torchvision import datasets, transforms

        torch.manual_seed(seed)
        self.device = device
        self.model = build_model(spec).to(device)
        train_set = datasets.FashionMNIST(str(root), train=True, transform=transforms.ToTensor(), download=False)
        test_set = datasets.FashionMNIST(str(root), train=False, transform=transforms.ToTensor(), download=False)
        self.loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True)
        self.test_loader = torch.utils.data.DataLoader(test_set, batch_size=BATCH)
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.criterion = nn.CrossEntropyLoss()
        self.batches = iter(self.loader)

    def run(self, steps: int) -> tuple[int, float]:
        """Train `steps` batches; return (images, seconds)."""
        self.model.train()
        images, running_loss, started = 0, 0.0, time.perf_counter()
        for _ in range(steps):
            try:
                x, y = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                x, y = next(self.batches)
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item()
            images += len(y)
        return images, time.perf_counter() - started

    def evaluate(self) -> float:
        """Seconds for one pass over the test set."""
        self.model.eval()
        correct, started = 0, time.perf_counter()
        with torch.no_grad():
            for x, y in self.test_loader:
                x, y = x.to(self.device), y.to(self.device)
                correct += (self.model(x).argmax(1) == y).sum().item()
        return time.perf_counter() - started


def naive_worker(connection, name: str, root: str, seed: int, device: str, threads: int) -> None:
    """Serve ("run", steps) and ("evaluate", None) requests for one model's naive loop until ("stop", None)."""
    if threads:
        torch.set_num_threads(threads)
    loop = NaiveLoop(ModelSpec.from_name(name), Path(root), seed, torch.device(device))
    connection.send("ready")
    while True:
        request, steps = connection.recv()
        if request == "run":
            before, faults = cpu_snapshot(), page_faults()
            images, seconds = loop.run(steps)
            connection.send((images, seconds, foreign_load(before, cpu_snapshot()), (page_faults() - faults) / steps))
        elif request == "evaluate":
            connection.send(loop.evaluate())
        else:
            return


class NaiveProcess:
    """The naive loop in a spawned worker: a process of its own, with none of the package's process-wide settings."""

    TIMEOUT = 1800  # seconds one request may take (M1.3's naive chunk takes ~15 s on 2 cores)

    def __init__(self, name: str, root: Path, seed: int, device: torch.device, threads: int):
        context = multiprocessing.get_context("spawn")  # not fork: a fresh interpreter and a pristine malloc
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=naive_worker, args=(theirs, name, str(root), seed, str(device), threads), daemon=True)
        self.process.start()
        theirs.close()
        self._receive()  # "ready": the dataset is loaded and the model built

    def _receive(self):
        try:
            if not self.connection.poll(self.TIMEOUT):
                raise RuntimeError(f"the naive loop's worker process did not answer within {self.TIMEOUT} s")
            return self.connection.recv()
        except EOFError:
            raise RuntimeError(f"the naive loop's worker process died (exit code {self.process.exitcode})") from None

    def run(self, steps: int) -> tuple[int, float, float, float]:
        """Train `steps` batches; return (images, seconds, cores other processes kept busy, page faults per step)."""
        self.connection.send(("run", steps))
        return self._receive()

    def evaluate(self) -> float:
        self.connection.send(("evaluate", None))
        return self._receive()

    def close(self) -> None:
        try:
            self.connection.send(("stop", None))
            self.process.join(timeout=30)
        except (BrokenPipeError, ConnectionResetError):  # it is gone already
            pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


# ------------------------------------------------------------------------------------- package path

def package_config(spec: ModelSpec, overrides: list[str], epochs: int) -> DictConfig:
    """The package's default config for this model, composed and validated exactly as the CLI does."""
    args = [f"model.conv={spec.conv}", f"model.lin={spec.lin}", f"model.filter_in={spec.filter_in}",
            f"model.filter_out={spec.filter_out}", f"epochs={epochs}",
            # The timed chunks carry a batch of test images and no validation split: a training-speed figure.
            "val_size=0", "select_metric=test_acc", "log_model=false", "system_metrics=false", *overrides]
    return jobs_of(args)[0][1]


def device_of(cfg: DictConfig) -> torch.device:
    return resolve_device(getattr(cfg.device, "value", cfg.device))  # an enum, or a plain string in newer configs


def chunk_of(data: FashionMNIST, steps: int) -> FashionMNIST:
    """The first `steps` batches of training images and one batch of test images."""
    n = steps * BATCH
    return FashionMNIST(data.train_images[:n], data.train_labels[:n], data.test_images[:BATCH], data.test_labels[:BATCH], data.source)


def package_eval_seconds(cfg: DictConfig, model: nn.Module, data: FashionMNIST, device: torch.device) -> float:
    """One test pass as train() runs it (its evaluate(), eval batch size, precision and memory format)."""
    memory_format = torch.channels_last if cfg.speed.channels_last else torch.contiguous_format
    images = data.test_images.to(device).contiguous(memory_format=memory_format)
    labels = data.test_labels.to(device)
    autocast = use_bf16(cfg, device)
    network = training_network(cfg, model, device)
    evaluate(network, images, labels, cfg.speed.eval_batch_size, autocast)  # warm-up
    best = float("inf")
    for _ in range(2):  # the best of two: the least disturbed by other processes
        started = time.perf_counter()
        evaluate(network, images, labels, cfg.speed.eval_batch_size, autocast)  # ends in .item(): synchronised
        best = min(best, time.perf_counter() - started)
    return best


# ----------------------------------------------------------------------------------------- one model

class EnoughRounds(Exception):
    """Raised from the package run's on_epoch callback once enough quiet rounds are in."""


def bench_model(name: str, args, data: FashionMNIST, root: Path, device: torch.device, peaks: dict) -> dict:
    spec = ModelSpec.from_name(name)
    cfg = package_config(spec, args.set, epochs=args.max_rounds + 1)
    default_threads = torch.get_num_threads()
    naive = NaiveProcess(name, root, cfg.seed, device, args.threads)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    rounds: list[dict] = []
    package_started = [cpu_snapshot()]
    package_faults = [page_faults()]

    # Quiet: other processes left free the cores the loops use (all of them at torch's default threads).
    loop_threads = max(default_threads, cfg.speed.threads or default_threads)
    spare_cores = max(0, (os.cpu_count() or loop_threads) - loop_threads)

    def quiet(r: dict) -> bool:
        return max(r["others_cores_package"], r["others_cores_naive"]) < spare_cores + args.quiet

    def after_package_epoch(metrics: EpochMetrics) -> None:
        package_ended, package_faults_per_step = cpu_snapshot(), (page_faults() - package_faults[0]) / args.steps
        images, seconds, others_cores_naive, naive_faults_per_step = naive.run(args.steps)
        rounds.append({
            "package": args.steps * BATCH / metrics.epoch_seconds,
            "naive": images / seconds,
            "others_cores_package": foreign_load(package_started[0], package_ended),
            "others_cores_naive": others_cores_naive,
            "package_page_faults_per_step": package_faults_per_step,
            "naive_page_faults_per_step": naive_faults_per_step,
        })
        quiet_count = sum(quiet(r) for r in rounds[1:])
        which = "warm-up" if len(rounds) == 1 else f"round {len(rounds) - 1} ({quiet_count}/{args.rounds} quiet)"
        print(f"  {name} {which}: package {rounds[-1]['package']:7.0f} img/s   naive {rounds[-1]['naive']:7.0f} img/s   "
              f"(other processes used {rounds[-1]['others_cores_package']:.1f} / {rounds[-1]['others_cores_naive']:.1f} cores)", flush=True)
        if quiet_count >= args.rounds or (len(rounds) > args.rounds and time.perf_counter() - started > 60 * args.max_minutes):
            raise EnoughRounds
        package_started[0], package_faults[0] = cpu_snapshot(), page_faults()

    if cfg.speed.threads:  # as fashioncnn/job/run.py does before train()
        torch.set_num_threads(cfg.speed.threads)
    started = time.perf_counter()
    package_started[0], package_faults[0] = cpu_snapshot(), page_faults()
    try:
        try:
            train(cfg, model, chunk_of(data, args.steps), device, on_epoch=after_package_epoch)
        except EnoughRounds:
            pass
        bench_seconds = time.perf_counter() - started
        naive_eval = min(naive.evaluate() for _ in range(2))
    finally:
        naive.close()
    # The first round is the warm-up. Rounds during which other processes kept the cores busy say more
    # about them than about either loop (two threads on two shared cores wait for each other): when
    # enough quiet rounds came, only those count; otherwise all rounds do, and the table says so.
    measured = [r for r in rounds[1:] if quiet(r)]
    if len(measured) < args.rounds:
        measured = rounds[1:]
    package_ips = statistics.median(r["package"] for r in measured)
    naive_ips = statistics.median(r["naive"] for r in measured)
    ratios = [r["package"] / r["naive"] for r in measured]

    flops = train_flops_per_image(spec)
    package_eval = package_eval_seconds(cfg, model, data, device)
    torch.set_num_threads(default_threads)
    result = {
        "model": name,
        "naive_img_s": round(naive_ips, 1),
        "package_img_s": round(package_ips, 1),
        "speedup": round(statistics.median(ratios), 3),
        "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "train_gflop_per_image": round(flops / 1e9, 5),
        "package_gflop_s": round(flops * package_ips / 1e9, 2),
        "naive_gflop_s": round(flops * naive_ips / 1e9, 2),
        "package_fraction_of_fp32_peak": round(flops * package_ips / 1e9 / peaks["fp32_gflop_s"], 4),
        "package_fraction_of_bf16_peak": round(flops * package_ips / 1e9 / peaks["bf16_gflop_s"], 4),
        "package_epoch_seconds": round(TRAIN_IMAGES / package_ips + package_eval, 1),
        "naive_epoch_seconds": round(TRAIN_IMAGES / naive_ips + naive_eval, 1),
        "package_eval_seconds": round(package_eval, 2),
        "naive_eval_seconds": round(naive_eval, 2),
        "epoch_seconds_how": "estimated: 60000 / median img/s + one measured pass over the 10,000 test images",
        "naive_page_faults_per_step": round(statistics.median(r["naive_page_faults_per_step"] for r in measured)),
        "package_page_faults_per_step": round(statistics.median(r["package_page_faults_per_step"] for r in measured)),
        "quiet_below_cores": spare_cores + args.quiet,
        "quiet_rounds": sum(quiet(r) for r in rounds[1:]),
        "rounds_counted": len(measured),
        "others_cores_median": round(statistics.median(max(r["others_cores_package"], r["others_cores_naive"]) for r in measured), 2),
        "rounds": [{k: round(v, 2) for k, v in r.items()} | {"quiet": quiet(r)} for r in rounds[1:]],
        "bench_seconds": round(bench_seconds, 1),
    }
    if args.full_epoch:
        full_cfg = package_config(spec, args.set, epochs=1)
        if full_cfg.speed.threads:
            torch.set_num_threads(full_cfg.speed.threads)
        torch.manual_seed(full_cfg.seed)
        history = train(full_cfg, build_model(spec), data, device).history
        torch.set_num_threads(default_threads)
        result["package_epoch_seconds_measured"] = round(history[0].epoch_seconds, 1)
    return result


# ------------------------------------------------------------------------------------------- output

def bench_precisions(device: torch.device) -> list[str]:
    """The package's precisions to time: fp32, and bf16 too where it is native (emulated bf16 is only slower)."""
    return ["fp32", "bf16"] if bf16_is_native(device) else ["fp32"]


def render_table(results: dict) -> str:
    machine, peaks = results["machine"], results["peaks"]
    where = f"{machine['gpu']} (CUDA)" if machine.get("gpu") else f"{machine['cpu']}, {machine['cpu_count']} cores, no GPU"
    threads = (f"both loops pinned to {results['threads']} thread{'s' if results['threads'] > 1 else ''} (--threads)"
               if results.get("threads") else "torch's default threads (all cores) for both loops")
    noisy = [r["model"] for r in results["models"] if r["rounds_counted"] > r["quiet_rounds"]]
    counted = (f"median of {results['rounds']} quiet alternations (other processes below "
               f"{results['models'][0]['quiet_below_cores']:g} cores) of {results['steps_per_chunk']} batches each, after a warm-up")
    if noisy:
        counted += (f"; for {', '.join(noisy)} too few rounds were quiet, so all rounds count and the figures are "
                    f"noisy (see the range and results.json)")
    bf16 = "" if machine["bf16_native"] else (
        f" This CPU has no native bf16: its bf16 matmul runs emulated at {peaks['bf16_gflop_s']:g} GFLOP/s, so the fraction "
        f"of the bf16 peak is over 100% and means nothing (the results file has it), and precision=bf16 falls back to fp32.")
    lines = [
        f"`make bench` on {where}; torch {machine['torch']} ({machine['cpu_capability']}), {results['date'][:10]}; batch 64; "
        f"{threads}; {counted}. Matmul peak measured in the same run: "
        f"{peaks['fp32_gflop_s']:g} GFLOP/s fp32, {peaks['bf16_gflop_s']:g} GFLOP/s bf16.{bf16} "
        f"Package options: {results['package_options']}.",
        "",
        "| model | naive img/s | package img/s | speedup (range over rounds) | fraction of fp32 / bf16 peak | epoch s, naive | epoch s, package |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["models"]:
        measured = f" ({r['package_epoch_seconds_measured']:.0f} measured)" if "package_epoch_seconds_measured" in r else ""
        bf16_cell = f"{100 * r['package_fraction_of_bf16_peak']:.1f}%" if machine["bf16_native"] else "n/a"
        lines.append(
            f"| {r['model']}{'' if r.get('precision', 'fp32') == 'fp32' else ' ' + r['precision']} | {r['naive_img_s']:.0f} | "
            f"{r['package_img_s']:.0f} | **{r['speedup']:.2f}x** "
            f"({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) | "
            f"{100 * r['package_fraction_of_fp32_peak']:.1f}% / {bf16_cell} | "
            f"{r['naive_epoch_seconds']:.0f} | {r['package_epoch_seconds']:.0f}{measured} |"
        )
    return "\n".join(lines)


def table_markers(results_file: Path) -> tuple[str, str]:
    """results.json fills <!-- speed-table -->; results-NAME.json fills <!-- speed-table results-NAME -->."""
    suffix = "" if results_file.name == RESULTS.name else f" {results_file.stem}"
    return f"<!-- speed-table{suffix} -->", f"<!-- /speed-table{suffix} -->"


def write_readme(results: dict, results_file: Path = RESULTS, readme: Path = README) -> bool:
    start, end = table_markers(results_file)
    text = readme.read_text()
    if start not in text or end not in text:
        print(f"{readme.name} has no {start} ... {end} markers: table not written")
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{render_table(results)}\n{end}{tail}")
    print(f"{readme.name}: table between {start} markers redrawn from {results_file.name}")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--steps", type=int, default=24, help="batches per timed chunk (default 24)")
    parser.add_argument("--rounds", type=int, default=9, help="quiet naive/package alternations wanted per model, after a warm-up")
    parser.add_argument("--max-rounds", type=int, default=20, help="alternations at most per model while waiting for quiet ones")
    parser.add_argument("--max-minutes", type=float, default=2, help="per model: stop waiting for quiet rounds after this long")
    parser.add_argument("--quiet", type=float, default=0.3,
                        help="a round is quiet when other processes kept fewer than this many of the loops' cores busy")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="package config overrides, e.g. compile=true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both loops (0: torch's default, all cores)")
    parser.add_argument("--full-epoch", action="store_true", help="also measure one real package epoch per model")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the speed table in benchmarks/README.md")
    parser.add_argument("--readme-only", action="store_true", help="only redraw benchmarks/README.md's table from --out")
    args = parser.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(args.out.read_text()), args.out)
        return

    register_schema()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_of(package_config(ModelSpec.from_name(MODELS[0]), args.set, 1))
    load_before = os.getloadavg()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}, load {load_before[0]:.1f}", flush=True)
    peaks = {"fp32_gflop_s": round(matmul_peak(torch.float32, device), 1), "bf16_gflop_s": round(matmul_peak(torch.bfloat16, device), 1)}
    print(f"matmul peak: {peaks['fp32_gflop_s']:.0f} GFLOP/s fp32, {peaks['bf16_gflop_s']:.0f} GFLOP/s bf16", flush=True)
    data = load(args.data_dir)
    root = torchvision_root(args.data_dir)
    try:
        models = []
        for name in args.models:
            for precision in bench_precisions(device):
                with_precision = argparse.Namespace(**{**vars(args), "set": [*args.set, f"precision={precision}"]})
                models.append(bench_model(name, with_precision, data, root, device, peaks) | {"precision": precision})
                r = models[-1]
                print(f"{name} {precision}: naive {r['naive_img_s']:.0f} img/s, package {r['package_img_s']:.0f} img/s, speedup {r['speedup']:.2f}x "
                      f"(rounds {r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}), {r['package_gflop_s']:.1f} GFLOP/s, "
                      f"epoch ~{r['naive_epoch_seconds']:.0f} s naive, ~{r['package_epoch_seconds']:.0f} s package, "
                      f"page faults per step {r['naive_page_faults_per_step']:,} naive, {r['package_page_faults_per_step']:,} package", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # A peak is a best case: measured again at the end, the higher figure stands (fractions follow it).
    again = {"fp32_gflop_s": round(matmul_peak(torch.float32, device), 1), "bf16_gflop_s": round(matmul_peak(torch.bfloat16, device), 1)}
    if again != peaks:
        for key in peaks:
            peaks[key] = max(peaks[key], again[key])
        for r in models:
            r["package_fraction_of_fp32_peak"] = round(r["package_gflop_s"] / peaks["fp32_gflop_s"], 4)
            r["package_fraction_of_bf16_peak"] = round(r["package_gflop_s"] / peaks["bf16_gflop_s"], 4)
        print(f"matmul peak (best of start and end): {peaks['fp32_gflop_s']:.0f} GFLOP/s fp32, {peaks['bf16_gflop_s']:.0f} GFLOP/s bf16")
    defaults = package_config(ModelSpec.from_name(MODELS[0]), args.set, 1)
    options = {key: OmegaConf.select(defaults, key) for key in ["precision", *speed_keys()]}
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "load_average": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)},
        "peaks": peaks,
        "batch_size": BATCH,
        "threads": args.threads,
        "steps_per_chunk": args.steps,
        "rounds": args.rounds,
        "package_options": ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in options.items()).replace("True", "true").replace("False", "false"),
        "overrides": args.set,
        "models": models,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_readme:
        write_readme(results, args.out)
    print()
    print(render_table(results))


if __name__ == "__main__":
    main()

"""Measure the package's speed options against each other: which ones pay, on this machine.

    python benchmarks/options.py --model M2.2.32.32 --variant "" --variant "channels_last=false" ...

Each variant (a list of config overrides on top of the package defaults; "" is the defaults) trains in
its own worker process, so process-wide settings (threads, reuse_memory, torch.compile's caches) cannot
leak between variants. Every worker runs one fashioncnn.core.loop.train() of `rounds + 1` short epochs of
`steps` batches and pauses after each epoch until told to go on; the variants take turns epoch by epoch
(the order rotating every round), so load from other processes hits them alike. The first epoch is the
warm-up (for compile=true it holds the compilation) and is reported separately. Prints, per variant,
the median images/s of the timed epochs and its ratio to the first variant's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys

BATCH = 64


def worker(model_name: str, overrides: list[str], steps: int, rounds: int, data_dir: str) -> None:
    import torch
    from bench import chunk_of, cpu_snapshot, device_of, foreign_load, package_config  # benchmarks/ is on sys.path

    from fashioncnn.core.config import register_schema
    from fashioncnn.core.data import load
    from fashioncnn.core.loop import train
    from fashioncnn.core.model import ModelSpec, build_model

    register_schema()
    spec = ModelSpec.from_name(model_name)
    cfg = package_config(spec, overrides, epochs=rounds + 1)
    data = chunk_of(load(data_dir), steps)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.speed.threads:  # as fashioncnn/job/run.py does before train()
        torch.set_num_threads(cfg.speed.threads)

    snapshot = [None]

    def report(metrics) -> None:
        now = cpu_snapshot()
        print(json.dumps({"epoch": metrics.epoch, "img_s": steps * BATCH / metrics.epoch_seconds, "seconds": metrics.epoch_seconds,
                          "foreign": foreign_load(snapshot[0], now), "img_cpu_s": steps * BATCH / (now[1] - snapshot[0][1])}), flush=True)
        if metrics.epoch < cfg.epochs:
            sys.stdin.readline()  # wait for our turn
            snapshot[0] = cpu_snapshot()

    print("ready", flush=True)
    sys.stdin.readline()
    snapshot[0] = cpu_snapshot()
    train(cfg, model, data, device_of(cfg), on_epoch=report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="M2.2.32.32")
    parser.add_argument("--variant", action="append", default=None, help='overrides, e.g. "channels_last=false threads=1"; repeat')
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--quiet", type=float, default=0.2, help="an epoch is quiet when other processes used fewer cores")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.model, shlex.split(args.worker), args.steps, args.rounds, args.data_dir)

    variants = args.variant or [""]
    procs = []
    for variant in variants:
        command = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--steps", str(args.steps),
                   "--rounds", str(args.rounds), "--data-dir", args.data_dir]
        procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for proc in procs:
        while (line := proc.stdout.readline()).strip() != "ready":
            if not line:
                raise SystemExit(f"a worker died: {proc.args}")
    results: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
    for round_ in range(args.rounds + 1):
        order = list(range(len(variants)))
        order = order[round_ % len(order):] + order[: round_ % len(order)]
        for i in order:
            procs[i].stdin.write("go\n")
            procs[i].stdin.flush()
            line = procs[i].stdout.readline()
            if not line:
                raise SystemExit(f"worker for {variants[i]!r} died")
            results[i].append(json.loads(line))
    for proc in procs:
        proc.wait()
    base = statistics.median(r["img_s"] for r in results[0][1:])
    quiet_base = [r["img_s"] for r in results[0][1:] if r["foreign"] < args.quiet]
    print(f"{args.model}, {args.steps} batches of {BATCH} per epoch, {args.rounds} timed epochs after one warm-up; "
          f"'quiet': epochs with other processes using < {args.quiet} cores")
    for i, variant in enumerate(variants):
        timed = [r["img_s"] for r in results[i][1:]]
        quiet = [r["img_s"] for r in results[i][1:] if r["foreign"] < args.quiet]
        median = statistics.median(timed)
        warm = results[i][0]["seconds"]
        steady = args.steps * BATCH / median
        quiet_text = (f"quiet {statistics.median(quiet):6.0f} img/s in {len(quiet)}" + (f" x{statistics.median(quiet) / statistics.median(quiet_base):.2f}" if quiet_base else "")) if quiet else "quiet: none"
        cpu = statistics.median(r["img_cpu_s"] for r in results[i][1:])
        cpu_base = statistics.median(r["img_cpu_s"] for r in results[0][1:])
        print(f"  {variant or '(defaults)':40s} {median:6.0f} img/s x{median / base:.2f} (range {min(timed):.0f}-{max(timed):.0f}; "
              f"per CPU second {cpu:.0f} x{cpu / cpu_base:.2f}; "
              f"others used {statistics.median(r['foreign'] for r in results[i][1:]):.2f} cores); {quiet_text}; "
              f"first epoch {warm:.1f}s vs {steady:.1f}s steady")


if __name__ == "__main__":
    main()

"""How long a new user waits for the first answer: `--help`, a refused value, a dry run, the console script.

Each command runs as a whole process (`python -m fashioncnn ...`, the `fashioncnn` script) in an empty
folder, --rounds times after one warm-up run; the figures are the fastest and the median wall seconds.
Written to benchmarks/results-first-contact.json with the machine it ran on.

    python benchmarks/first_contact.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results-first-contact.json"
SCRIPT = str(Path(sys.executable).parent / "fashioncnn")
COMMANDS = {
    "python -m fashioncnn --help": [sys.executable, "-m", "fashioncnn", "--help"],
    "python -m fashioncnn conv=7": [sys.executable, "-m", "fashioncnn", "conv=7"],
    "python -m fashioncnn model.conv=0": [sys.executable, "-m", "fashioncnn", "model.conv=0"],
    "fashioncnn --help": [SCRIPT, "--help"],
    "fashioncnn TAB completion (fashioncnn con<TAB>)": ["env", "COMP_LINE=fashioncnn con", "COMP_POINT=14", SCRIPT, "-sc", "query=bash"],
    "fashioncnn -m conv=2,3 --dry-run (empty store)": [SCRIPT, "-m", "conv=2,3", "--dry-run"],
}


def machine() -> dict[str, object]:
    flags = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def wall_seconds(command: list[str], cwd: str) -> tuple[float, int]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine(), "rounds": args.rounds, "commands": {}}
    with tempfile.TemporaryDirectory(prefix="fashioncnn-first-contact-") as folder:
        for name, command in COMMANDS.items():
            wall_seconds(command, folder)  # warm-up: the file cache, .pyc files
            times, codes = zip(*(wall_seconds(command, folder) for _ in range(args.rounds)))
            results["commands"][name] = {"fastest_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
                                         "exit_codes": sorted(set(codes))}
            print(f"{name:<50} fastest {min(times):6.2f} s   median {statistics.median(times):6.2f} s   exit {sorted(set(codes))}")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()

"""Cost of the per-epoch checkpoint, as a fraction of the epoch it protects.

For each model: the seconds of one `save_atomically` (model + Adam state + RNG states, written
atomically) against the seconds of one training epoch at batch 64 (timed steps x 938 steps; the test
pass is left out, which makes the fraction an upper bound). Run: .venv/bin/python benchmarks/checkpoint_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fashioncnn.core.model import ModelSpec, build_model
from fashioncnn.job.checkpoints import save_atomically

STEPS_PER_EPOCH = 938  # 60,000 images at batch 64


def measure(name: str, timed_steps: int = 30, saves: int = 5) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_name(name))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, foreach=True)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(timed_steps):
        step()
    epoch_seconds = (time.perf_counter() - started) / timed_steps * STEPS_PER_EPOCH

    save_seconds = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.pt"
        for _ in range(saves):
            started = time.perf_counter()
            save_atomically(path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                        order_rng=torch.Generator().get_state(), torch_rng=torch.get_rng_state(),
                                        history=[], images_seen=0))
            save_seconds.append(time.perf_counter() - started)
        size_mb = path.stat().st_size / 1e6
    save = statistics.median(save_seconds)
    return {"epoch_seconds": epoch_seconds, "save_seconds": save, "size_mb": size_mb, "percent": 100 * save / epoch_seconds}


def main() -> None:
    print(f"{'model':<12} {'checkpoint MB':>13} {'save s':>8} {'epoch s':>8} {'overhead':>9}")
    for name in ("M2.2.32.32", "M3.3.32.32", "M1.3.32.32"):
        r = measure(name)
        print(f"{name:<12} {r['size_mb']:>13.1f} {r['save_seconds']:>8.3f} {r['epoch_seconds']:>8.1f} {r['percent']:>8.2f}%")


if __name__ == "__main__":
    main()

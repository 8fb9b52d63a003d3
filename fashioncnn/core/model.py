"""The study's model family M<conv>.<lin>.<filter_in>.<filter_out>.

Each conv block is Conv2d(kernel) -> ReLU -> MaxPool2d(2). The first conv has `filter_in` output
channels and padding that keeps the size; every later conv has `filter_out` channels and no padding.
Then Flatten and `lin` linear layers with ReLU between them, each hidden layer half as wide as its
input, the last mapping to the 10 classes. Example: M2.2.32.32 is 1152 -> 576 -> 10 (679,466 params).

Beyond the study, off by default: `norm=batch` puts a BatchNorm2d after each conv, `dropout` a Dropout
before each hidden linear layer. A model (or run) that uses them, or the training options of
config.py's "beyond the study" part, is named with a suffix (`M2.2.32.32+bn+do0.3+flip+shift2+onecycle`);
without them the name is the study's.

`python -m fashioncnn.model M2.3.32.64` prints a model's layers, output shapes and parameter count.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fashioncnn.core.config import ConfigError

if TYPE_CHECKING:  # torch loads when a network is built, not when a model's name or size is asked
    from torch import nn

IMAGE_SIZE = 28
NUM_CLASSES = 10
_NAME = re.compile(r"^M(\d+)\.(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class ModelSpec:
    conv: int
    lin: int
    filter_in: int
    filter_out: int
    kernel_size: int = 3
    norm: str = "none"  # "batch": BatchNorm2d after each conv
    dropout: float = 0.0  # before each hidden linear layer

    @property
    def name(self) -> str:
        suffix = ("+bn" if self.norm == "batch" else "") + (f"+do{self.dropout:g}" if self.dropout else "")
        return f"M{self.conv}.{self.lin}.{self.filter_in}.{self.filter_out}{suffix}"

    @classmethod
    def from_name(cls, name: str, kernel_size: int = 3) -> ModelSpec:
        match = _NAME.match(name.strip())
        if not match:
            raise ConfigError(f"model name {name!r}: not allowed, must look like M2.3.32.64 (M<conv>.<lin>.<filter_in>.<filter_out>)")
        conv, lin, filter_in, filter_out = (int(g) for g in match.groups())
        return cls(conv, lin, filter_in, filter_out, kernel_size)

    @classmethod
    def from_config(cls, model_cfg: Any) -> ModelSpec:
        norm = getattr(model_cfg, "norm", "none")
        return cls(model_cfg.conv, model_cfg.lin, model_cfg.filter_in, model_cfg.filter_out, model_cfg.kernel_size,
                   getattr(norm, "value", norm), float(getattr(model_cfg, "dropout", 0.0)))

    def feature_map_sizes(self) -> list[int]:
        """Side length of the feature map after each conv block; a value < 1 means it collapsed."""
        sizes, side = [], IMAGE_SIZE
        for block in range(self.conv):
            padding = self.kernel_size // 2 if block == 0 else 0
            side = side + 2 * padding - self.kernel_size + 1
            side = side // 2 if side >= 1 else side
            sizes.append(side)
            if side < 1:
                break
        return sizes

    def linear_widths(self) -> list[int]:
        """Input width of each linear layer, then the 10 classes."""
        side = self.feature_map_sizes()[-1]
        channels = self.filter_in if self.conv == 1 else self.filter_out
        widths = [channels * side * side]
        for _ in range(self.lin - 1):
            widths.append(widths[-1] // 2)
        return widths + [NUM_CLASSES]

    def check_feasible(self) -> None:
        """Refuse, before any training, a model whose feature map or hidden layers shrink to nothing."""
        side, k = IMAGE_SIZE, self.kernel_size
        for block in range(1, self.conv + 1):
            padding = k // 2 if block == 1 else 0
            if side + 2 * padding < k:
                raise ConfigError(
                    f"{self.name}: conv block {block} gets a {side}x{side} feature map, too small for a "
                    f"{k}x{k} kernel; with kernel {k} on {IMAGE_SIZE}x{IMAGE_SIZE} images at most "
                    f"{len([s for s in self.feature_map_sizes() if s >= 1])} conv blocks fit (model.conv={self.conv})"
                )
            side = (side + 2 * padding - k + 1) // 2
            if side < 1:
                raise ConfigError(
                    f"{self.name}: max-pooling after conv block {block} shrinks the feature map to 0x0; "
                    f"use fewer conv blocks (model.conv={self.conv})"
                )
        widths = self.linear_widths()
        if min(widths[:-1]) < 1:
            raise ConfigError(
                f"{self.name}: linear layer widths {' -> '.join(map(str, widths))} shrink to 0; "
                f"use fewer linear layers (model.lin={self.lin})"
            )


def build_model(spec: ModelSpec) -> nn.Sequential:
    from torch import nn

    spec.check_feasible()
    layers: list[nn.Module] = []
    in_channels = 1
    for block in range(spec.conv):
        out_channels = spec.filter_in if block == 0 else spec.filter_out
        padding = spec.kernel_size // 2 if block == 0 else 0
        layers.append(nn.Conv2d(in_channels, out_channels, spec.kernel_size, padding=padding))
        layers += [nn.BatchNorm2d(out_channels)] if spec.norm == "batch" else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = out_channels
    layers.append(nn.Flatten())
    widths = spec.linear_widths()
    for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        hidden = i < len(widths) - 2
        layers += [nn.Dropout(spec.dropout)] if spec.dropout and hidden else []
        layers.append(nn.Linear(width_in, width_out))
        if hidden:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def run_name(cfg: Any) -> str:
    """The model's name, plus the training options that are not at their defaults (the study's runs: just the model)."""
    suffix = "+flip" if cfg.augment.flip else ""
    suffix += f"+shift{cfg.augment.shift}" if cfg.augment.shift else ""
    schedule = str(cfg.schedule.name)
    suffix += f"+{schedule}" if schedule != "constant" else ""
    suffix += f"+ls{cfg.label_smoothing:g}" if cfg.label_smoothing else ""
    return ModelSpec.from_config(cfg.model).name + suffix


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(spec: ModelSpec) -> str:
    """A table of layers, output shapes and parameter counts, as the study's tables compare sizes."""
    import torch

    model = build_model(spec)
    rows = [("layer", "output shape", "params")]
    x = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        for index, layer in enumerate(model):
            x = layer(x)
            params = count_parameters(layer)
            rows.append((f"{index:>2} {layer}", "x".join(map(str, x.shape[1:])), f"{params:,}" if params else ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{spec.name}  (input 1x{IMAGE_SIZE}x{IMAGE_SIZE})"]
    lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
    lines.append(f"total parameters: {count_parameters(model):,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fashioncnn.model M<conv>.<lin>.<filter_in>.<filter_out> [...]\n\n"
              "example: python -m fashioncnn.model M2.3.32.64 M3.2.16.32   (layers, shapes and parameter counts)")
        return 0 if argv else 2
    status = 0
    for name in argv:
        try:
            print(describe(ModelSpec.from_name(name)), end="\n\n", flush=True)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

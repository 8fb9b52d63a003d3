"""`python -m fashioncnn.predict MODEL FILE...`: classify pictures of clothing with a logged or registered model.

    python -m fashioncnn.predict models:/fashioncnn@champion shirt.jpg boot.png
    python -m fashioncnn.predict <run id> t10k-images-idx3-ubyte.gz

MODEL is `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/<model id>`, `runs:/<run id>/model`, or
a run id (its logged model, see serving.model_uri_of_run). FILE is a PNG or JPEG picture of any size
and colour, or an IDX file (Fashion-MNIST's image format, .gz or not) whose every image is one input.
Prints one line per input: `FILE[#INDEX]  CLASS  PROBABILITY`.

A picture is made to look like a Fashion-MNIST image, following the data set's own conversion (trim,
longest side to 28, centre, negate) in `prepare_image`:
1. EXIF rotation applied, transparency flattened onto white, converted to grayscale.
2. Inverted when the background is light (the median of the outermost pixels above mid-grey): pictures of
   clothing are mostly dark on white, Fashion-MNIST is light on black. Then the background level is
   mapped to black, as in the data set.
3. Trimmed to the object (pixels that differ from the background by more than 10%), padded to a square
   with the background, centred, and resized to 28x28. Padding rather than stretching keeps the shape:
   a stretched boot looks like a bag.
IDX images are Fashion-MNIST's already and are used as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from PIL import Image

SIDE = 28  # model.IMAGE_SIZE; model.py imports torch, which the checks of the arguments need not wait for
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # a picture to classify; more is refused before decoding (a decompression bomb)
TRIM_THRESHOLD = 0.10
BATCH = 1000
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class InputError(Exception):
    """A file that cannot be read as an input; the message is one line."""


def border(gray: np.ndarray) -> np.ndarray:
    """The outermost pixels of an image."""
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def has_light_background(gray: np.ndarray) -> bool:
    """Whether a grayscale image (0..255) is dark on light, judged from its border: its median above mid-grey."""
    return float(np.median(border(gray))) > 127.5


def prepare_image(image: Image.Image) -> np.ndarray:
    """A picture as a Fashion-MNIST input: (28, 28) float32 in [0, 1], light object on black (see the module doc)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    if has_light_background(gray):
        gray = 255.0 - gray
    background = float(np.median(border(gray)))  # at most mid-grey now
    pixels = np.clip((gray - background) / (255.0 - background), 0.0, 1.0)
    rows, cols = np.flatnonzero((pixels > TRIM_THRESHOLD).any(1)), np.flatnonzero((pixels > TRIM_THRESHOLD).any(0))
    if rows.size:  # a blank picture stays whole
        pixels = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = pixels.shape
    side = max(height, width)
    square = np.zeros((side, side), np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    resized = Image.fromarray(square).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def read_inputs(path: Path) -> list[tuple[str, np.ndarray]]:
    """(label, 28x28 float32 image) for each input in the file: one for a picture, every image of an IDX file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(2)
    if head in (b"\x1f\x8b", b"\x00\x00"):  # gzip, or an IDX file's magic number
        from fashioncnn.core.data import read_idx

        try:
            images = read_idx(path)
        except (ValueError, OSError, EOFError) as error:  # a bad header, a broken .gz
            raise InputError(f"{path}: not an IDX image file ({str(error).splitlines()[0]})") from error
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or images.dtype != np.uint8:
            raise InputError(f"{path}: IDX data of shape {images.shape} ({images.dtype}), expected {SIDE}x{SIDE} "
                             "uint8 images (a labels file?)")
        return [(f"{path}#{i}", image.astype(np.float32) / 255.0) for i, image in enumerate(images)]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only: the size is known before any pixel is decoded
            if image.width * image.height > MAX_PIXELS:
                raise InputError(f"{path}: {image.width}x{image.height} pixels, above the limit of {MAX_PIXELS:,} "
                                 f"({MAX_SIDE}x{MAX_SIDE}); shrink it first (the model sees {SIDE}x{SIDE})")
            return [(str(path), prepare_image(image))]
    except Image.DecompressionBombError as error:  # PIL's own guard, for sizes far beyond ours
        raise InputError(f"{path}: too many pixels to decode safely, above the limit of {MAX_PIXELS:,} ({MAX_SIDE}x{MAX_SIDE}); "
                         f"shrink it first (the model sees {SIDE}x{SIDE})") from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a PNG/JPEG image or an IDX file ({type(error).__name__})") from error


def _what_exists(client: MlflowClient, uri: str) -> str:
    """For a registry URI that did not load: the registered models, or the model's aliases and versions."""
    from mlflow.exceptions import MlflowException

    name = uri[len("models:/"):].split("@")[0].split("/")[0]
    if not uri.startswith("models:/") or name.startswith("m-"):  # runs:/..., or a LoggedModel id
        return ""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        if not names:
            return "; no model is registered yet: register a sweep's best with python -m fashioncnn.register EXPERIMENT"
        return f"; registered models: {', '.join(names)}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"@{alias} = version {version}" for alias, version in sorted(model.aliases.items()))
    return f"; {name} has versions {', '.join(map(str, versions)) or '(none)'}, aliases {aliases or '(none)'}"


def resolve(client: MlflowClient, target: str) -> str:
    """The model URI that MODEL names: a URI as it is, a run id through its logged model."""
    from fashioncnn.tracking.queries import ResultsError

    if target.startswith(("models:/", "runs:/")):
        return target
    if _RUN_ID.match(target):
        from fashioncnn.serving.flavor import model_uri_of_run

        return model_uri_of_run(client, target)
    raise ResultsError(f"{target}: not a model: give models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, "
                       "runs:/<run id>/model or a run id")


def predict(model_uri: str, inputs: list[tuple[str, np.ndarray]]) -> list[tuple[str, str, float]]:
    """(label, class name, probability) of the most probable class of each input, with the loaded MLflow model."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    from fashioncnn.serving.flavor import CLASSES

    batch = np.stack([image for _, image in inputs])[:, None].astype(np.float32)
    probabilities = np.concatenate([np.asarray(model.predict(batch[i : i + BATCH])) for i in range(0, len(batch), BATCH)])
    best = probabilities.argmax(1)
    return [(label, CLASSES[c], float(p[c])) for (label, _), c, p in zip(inputs, best, probabilities)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fashioncnn.predict",
        description="Classify PNG/JPEG pictures or IDX files with a logged or registered fashioncnn model.",
        epilog="example: python -m fashioncnn.predict models:/fashioncnn@champion shirt.png t10k-images-idx3-ubyte.gz")
    parser.add_argument("model", metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, or a run id")
    parser.add_argument("files", metavar="FILE", nargs="+", type=Path, help="PNG/JPEG pictures, IDX image files (.gz or not)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)")
    args = parser.parse_args(argv)
    try:
        inputs = [item for path in args.files for item in read_inputs(path)]  # bad files fail before the model loads
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from fashioncnn.tracking.queries import ResultsError, mask, tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = tracking_uri(args.tracking_uri)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        model_uri = resolve(client, args.model)
        try:
            results = predict(model_uri, inputs)
        except MlflowException as error:
            message = (str(error).strip() or type(error).__name__).splitlines()[0].rstrip(".")
            raise ResultsError(f"{args.model}: {message}{_what_exists(client, model_uri)}") from error
    except (ResultsError, MlflowException) as error:
        print(f"error: {mask(str(error))}", file=sys.stderr)
        return 2
    for label, name, probability in results:
        print(f"{label}  {name}  {probability:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

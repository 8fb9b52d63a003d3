"""A trained network as an MLflow model that anyone can load and use: pixels in, class probabilities out.

`log_model(network)` logs `Classifier(network)` to the active run as an MLflow 3 LoggedModel named
"model" (the run's "Logged models" in the UI). It is saved in MLflow's "pt2" format: a graph traced by
`torch.export`, so loading needs torch and mlflow but neither this package nor pickle (MLflow 3 refuses
pickled models unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set). Load it anywhere with

    model = mlflow.pyfunc.load_model("models:/fashioncnn@champion")   # or models:/<model id>
    probabilities = model.predict(images)   # float32 (N, 1, 28, 28) in [0, 1] -> (N, 10)
    classes = [CLASSES[i] for i in probabilities.argmax(1)]

Images are Fashion-MNIST's: light clothing on a dark background, 0 black, 1 white (see predict.py for
photos). The model normalises them itself, so callers never need the training set's mean and std.
"""

from __future__ import annotations

import copy

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

# Both torch and mlflow at the top: fashioncnn.core.data and .model use torch and fashioncnn.tracking.queries imports mlflow,
# so importing them later would save nothing. register.py imports this module only once it needs it.
from fashioncnn.core.data import MEAN, STD
from fashioncnn.core.model import IMAGE_SIZE, NUM_CLASSES
from fashioncnn.tracking.queries import ResultsError, mask

# Fashion-MNIST's labels 0..9, in order.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MODEL_NAME = "model"  # the LoggedModel's name, as runs:/<run id>/model names it


class Classifier(nn.Module):
    """Pixels in [0, 1], (N, 1, 28, 28) or (N, 28, 28), to softmax probabilities of the 10 classes (N, 10)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(1)
        return torch.softmax(self.network((pixels - MEAN) / STD), dim=1)


def example_batch() -> torch.Tensor:
    """Two inputs: a blank image and a bright square. Two, because torch.export fixes a batch size of 1."""
    batch = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    batch[1, 0, 7:21, 7:21] = 1.0
    return batch


def log_model(network: nn.Module) -> ModelInfo:
    """Log Classifier(a CPU, fp32, eval-mode copy of `network`) to the active run as the LoggedModel "model"."""
    if mlflow.active_run() is None:
        raise RuntimeError("fashioncnn.serving.flavor.log_model needs an active MLflow run to attach the model to")
    network = getattr(network, "_orig_mod", network)  # a torch.compile'd network: export the original
    # A copy, so the caller's network stays where and as it was. Contiguous memory: the pt2 archive
    # mishandles channels_last weights (torch warns "No complete tensor found in the group").
    classifier = Classifier(copy.deepcopy(network)).to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
    classifier.eval().requires_grad_(False)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )
    return mlflow.pytorch.log_model(
        classifier,
        name=MODEL_NAME,
        signature=signature,
        input_example=example_batch().numpy(),
        serialization_format="pt2",
        # Named, so MLflow does not infer them: inference loads the model in a subprocess (seconds) and
        # warns when it cannot. What loading a pt2 model needs is torch; MLflow adds itself.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata={"classes": list(CLASSES), "input": "float32 pixels in [0, 1], (N, 1, 28, 28), light object on a dark background"},
    )


def model_uri_of_run(client: MlflowClient, run_id: str) -> str:
    """`models:/<model id>` of the newest READY LoggedModel the run produced, else `runs:/<run id>/model`."""
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise ResultsError(f"run {run_id}: not found in {mask(client.tracking_uri)}") from error
    models, token = [], None
    while True:  # a run resumed or retrained in place may have logged more than one
        page = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=100, page_token=token)
        models += [m for m in page if m.status == LoggedModelStatus.READY]
        token = page.token
        if not token:
            break
    if models:
        return max(models, key=lambda m: (m.name == MODEL_NAME, m.creation_timestamp or 0)).model_uri
    # Before MLflow 3, a model was a folder of the run's artifacts.
    if any(f.path == f"{MODEL_NAME}/MLmodel" for f in client.list_artifacts(run_id, MODEL_NAME)):
        return f"runs:/{run_id}/{MODEL_NAME}"
    raise ResultsError(f"run {run_id} has no logged model: it was trained with log_model=false or before "
                       "models were logged; retrain it")

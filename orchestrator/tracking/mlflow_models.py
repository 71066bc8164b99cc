"""What makes MLflow's UI show bkd's runs as model training: the experiment's kind, each run's
dataset (Dataset column) and the best student as a logged MLflow model (Models column, Registry)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"  # not GenAI: the UI opens the experiment on its runs


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    if client.get_experiment(experiment_id).tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(experiment_id, KIND_TAG, KIND)


def log_dataset(client: MlflowClient, run_id: str, spec: Mapping[str, str]) -> None:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(source=LocalArtifactDatasetSource(spec["source"]), name=spec["name"], digest=spec["digest"])
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])


def log_student_model(tracking_uri: str, run_id: str, student: Any, example: Any, registered_name: Optional[str],
                      any_length: bool = False) -> str:
    """Log ``student`` (a torch module) on ``run_id`` as an MLflow PyTorch model with a signature and an
    input example, its batch dimension dynamic (``pyfunc.predict`` takes any batch; ``any_length``: the last
    dimension too, texts of any token count); register it as ``registered_name`` when given. Returns the model URI."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    student = student.eval()
    if example.shape[0] < 2:  # torch.export makes a batch of 1 static: serve any batch size
        example = example.expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        output = student(example).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # the flavour's own requirements (torch, cloudpickle): inferring them runs the model in a subprocess (~10 s)
        signature = infer_signature(example.numpy(), output)
        if any_length:  # packed token ids (B, 3, L): any batch of texts of any length
            spec = signature.inputs.inputs[0]
            signature = ModelSignature(Schema([TensorSpec(spec.type, (-1, *spec.shape[1:-1], -1))]), signature.outputs)
        info = mlflow.pytorch.log_model(student, name="student", signature=signature,
                                        input_example=example.numpy(), registered_model_name=registered_name,
                                        pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    return info.model_uri


def log_generating_model(tracking_uri: str, run_id: str, folder: str, registered_name: Optional[str]) -> str:
    """Log a causal LM's Hugging Face ``folder`` on ``run_id`` as an MLflow model that turns a list of prompts into
    generated texts (``orchestrator.tracking.lm_pyfunc``, logged as code; ``params={"max_new_tokens": N}``); register
    it as ``registered_name`` when given. Returns the model URI."""
    import warnings
    from pathlib import Path

    import mlflow
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    code = Path(__file__).with_name("lm_pyfunc.py")
    signature = infer_signature(["the prompt"], ["the generated text"], params={"max_new_tokens": 64})
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)  # the signature is given
        info = mlflow.pyfunc.log_model(name="student", python_model=str(code), artifacts={"student_hf": str(folder)},
                                       signature=signature, input_example=["the prompt"],
                                       registered_model_name=registered_name,
                                       pip_requirements=["torch", "transformers", "mlflow"])
    return info.model_uri

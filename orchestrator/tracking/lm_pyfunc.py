"""The MLflow model of a distilled causal LM: a list of prompts in, the generated texts out. Logged as code
(``mlflow.pyfunc.log_model(python_model=<this file>)``) beside the student's Hugging Face folder, so serving it needs
torch and transformers only.

    model = mlflow.pyfunc.load_model(uri)
    model.predict(["the sky is", "count one"], params={"max_new_tokens": 16})   # -> ["blue ...", "two three ..."]
"""
from __future__ import annotations

import warnings
from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model

warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")  # the logged signature declares it

ARTIFACT = "student_hf"  # the artifact key of the Hugging Face folder


def prompts_of(model_input: Any) -> list[str]:
    """Prompts from a list, a pandas Series or a DataFrame (its ``prompt`` column, else its first)."""
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if hasattr(model_input, "tolist"):
        return [str(v) for v in model_input.tolist()]
    return [str(v) for v in (model_input if isinstance(model_input, (list, tuple)) else [model_input])]


class GeneratingLM(mlflow.pyfunc.PythonModel):
    """Greedy generation by the student (``max_new_tokens``, default 64), prompts padded on the left."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts[ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()

    def predict(self, context, model_input, params=None):  # no type hints: the logged signature declares max_new_tokens
        import torch

        prompts = prompts_of(model_input)
        new = int((params or {}).get("max_new_tokens", 64))
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


set_model(GeneratingLM())

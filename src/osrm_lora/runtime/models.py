"""Loading the model every stage runs: a sequence-classification head sized for the task, float32."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..errors import ModelError
from ..tasks import TaskSpec, resolve_model_path


def _path_like(name: str) -> bool:
    """Whether `name` can only be a folder: absolute, ./, ../, ~, or more than one `/` (a Hub id has one)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def load_model_and_tokenizer(model_name: str, spec: TaskSpec, trust_remote_code: bool = False):
    """A float32 sequence-classification model sized for the task's labels, and its tokenizer.

    Decoders without a pad token pad with eos; the model config gets that id, so its head reads the last real
    token of each padded sequence.
    """
    path = resolve_model_path(model_name)
    if _path_like(path) and not Path(path).expanduser().exists():  # else the Hub's complaint about repo names
        raise ModelError(f"model {model_name!r}: no such folder (a Hub id is a name or org/name)")
    labels = ["score"] if spec.is_regression else list(spec.label_names)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            problem_type="regression" if spec.is_regression else "single_label_classification",
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
        )
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met more than tensors: nothing ran
        pickles = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        named = ", ".join(pickles) or "its weights file"
        raise ModelError(
            f"model {model_name!r}: {named} is not a safe format (a pickle holding more than tensors), refused; "
            f"use a safetensors copy of the weights"
        ) from None
    except OSError as exc:  # transformers' messages span lines and may not name the model
        raise ModelError(f"model {model_name!r}: {' '.join(str(exc).split())}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {model_name!r}: the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

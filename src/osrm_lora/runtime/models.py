"""Loading the model every stage runs: a sequence-classification head sized for the task, float32."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ..errors import ModelError
from ..tasks import TaskSpec, resolve_model_path


def load_model_and_tokenizer(model_name: str, spec: TaskSpec, trust_remote_code: bool = False):
    """A float32 sequence-classification model sized for the task's labels, and its tokenizer.

    Decoders without a pad token pad with eos; the model config gets that id, so its head reads the last real
    token of each padded sequence.
    """
    path = resolve_model_path(model_name)
    labels = ["score"] if spec.is_regression else list(spec.label_names)
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
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model {model_name!r}: the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

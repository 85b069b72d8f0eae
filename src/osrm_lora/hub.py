"""The Hugging Face Hub: push an output folder with a model card, and read statistics/subspace files from it.

`push_folder` creates the repository if needed and uploads the folder through `huggingface_hub.HfApi`
(`create_repo` + `upload_folder`, with the token of `hf auth login` or $HF_TOKEN); the folder's README.md is
the card `ModelCard` renders: base model, tasks, inits, method and hyper-parameters, and the scores that were
measured. `hub_file` reads `user/repo/path/in/repo.safetensors[@revision]` through `hf_hub_download`, so
`--stats`/`--subspace` take Hub files as well as local ones. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .errors import OsrmLoraError

CARD_NAME = "README.md"
PROJECT_URL = "https://arxiv.org/abs/2505.22934"


class HubError(OsrmLoraError):
    """A Hub repository or file that cannot be named, read or written; the message names it."""


def _valid_name(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_repo_id(name: str | None) -> bool:
    """`user/repo` as the Hub accepts it: one slash, valid characters (the one check of a repository id)."""
    return bool(name) and name.count("/") == 1 and _valid_name(name)


def check_repo_id(repo_id: str, option: str = "--push-to-hub") -> str:
    """`user/repo`, checked before any work is done (a typo must not cost a training run)."""
    if not is_repo_id(repo_id):
        raise HubError(f"{option} {repo_id!r}: not a Hub repository id user/repo")
    return repo_id


@dataclass
class Card:
    """What a model card states; `scores` maps a row label to its metrics ({} when none was measured)."""

    kind: str  # "LoRA adapter", "merged LoRA adapter", "merged full model"
    base_model: str | None
    tasks: list[str]
    inits: dict[str, str | None]  # task -> the init its adapter started from (None: not recorded)
    method: str  # how the weights were made: "fine-tuned (...)" or the merge method
    hyperparameters: dict[str, Any]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    scores_note: str = ""
    library: str = "peft"

    def render(self, repo_id: str) -> str:
        """Markdown with the Hub's YAML metadata (a base_model that is a local folder is left out of it)."""
        tags = ["osrm-lora", "lora", "merge"] if "merge" in self.kind else ["osrm-lora", "lora"]
        data = ModelCardData(library_name=self.library, tags=tags,
                             base_model=self.base_model if _is_hub_id(self.base_model) else None)
        inits = ", ".join(f"{t}: {i or 'not recorded'}" for t, i in self.inits.items()) or "not recorded"
        rows = [("base model", f"`{self.base_model or 'not recorded'}`"), ("tasks", ", ".join(self.tasks)),
                ("init", inits), ("method", self.method), ("hyper-parameters", _params(self.hyperparameters))]
        intro = (f"A {self.kind} made with osrm-lora (OSRM: orthogonal subspaces for robust model merging, "
                 f"[arXiv 2505.22934]({PROJECT_URL})).")
        lines = [f"# {repo_id.rsplit('/', 1)[-1]}", "", intro, "", "| | |", "|---|---|",
                 *(f"| {k} | {v} |" for k, v in rows), "", "## Scores", "", *self._score_lines(), "",
                 "## Use", "", "```python", *self._usage(repo_id), "```", ""]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content

    def _score_lines(self) -> list[str]:
        note = [self.scores_note] if self.scores_note else []
        if not self.scores:
            return note or ["Not measured."]
        metrics = sorted({m for row in self.scores.values() for m in row})
        table = [f"| | {' | '.join(metrics)} |", "|---|" + "---|" * len(metrics)]
        table += [f"| {label} | " + " | ".join(_number(row.get(m)) for m in metrics) + " |"
                  for label, row in self.scores.items()]
        return [*table, "", *note] if note else table

    def _usage(self, repo_id: str) -> list[str]:
        if self.library != "peft":
            return ["from transformers import AutoModelForSequenceClassification", "",
                    f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")']
        return ["from peft import PeftModel", "from transformers import AutoModelForSequenceClassification", "",
                f'base = AutoModelForSequenceClassification.from_pretrained("{self.base_model}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")']


def _is_hub_id(name: str | None) -> bool:
    """A model id the Hub knows (`user/repo`, or a legacy id without a namespace) that is not a local path."""
    return bool(name) and name.count("/") <= 1 and not Path(name).exists() and _valid_name(name)


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in params.items()) or "-"


def _write_card(folder: str | Path, card: Card, repo_id: str) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(card.render(repo_id), encoding="utf-8")
    return path


def push_folder(folder: str | Path, repo_id: str, card: Card, message: str) -> str:
    """Write the card into `folder` and upload the folder to `repo_id` (created if missing, public by the
    account's default); hidden files (the output marker) stay local. Returns the repository URL."""
    check_repo_id(repo_id)
    _write_card(folder, card, repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, ignore_patterns=[".*"])
    except OSError as exc:  # HTTP errors, no token, no network
        raise HubError(f"{repo_id}: cannot push {folder} to the Hugging Face Hub ({exc})") from exc
    return str(url)


def hub_file(spec: str | Path) -> Path:
    """A local file as it is; else `user/repo/path/in/repo[@revision]` downloaded (and cached) from the Hub."""
    path = Path(spec)
    if path.exists():
        return path
    text, _, revision = str(spec).partition("@")
    parts = text.split("/")
    if len(parts) < 3 or not _is_hub_id("/".join(parts[:2])):
        raise HubError(f"{spec}: no such file, and not a Hub file user/repo/path[@revision]")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except (OSError, ValueError) as exc:  # not found, no network, a bad revision
        raise HubError(f"{spec}: no such local file, nor file {filename!r} in Hub repository {repo_id!r} ({exc})"
                       ) from exc


def _flat(sections: dict[str, Any]) -> dict[str, Any]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": 8}` (one level), for the card's hyper-parameter row."""
    flat = {}
    for key, value in sections.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif value is not None:
            flat[key] = value
    return flat


def train_card(metadata: dict[str, Any]) -> Card:
    """The card of an adapter `train.finetune` wrote, from its osrm_lora.json metadata."""
    task, subspace = metadata["task"], metadata.get("subspace") or {}
    scores = {f"{task} (dev)": metadata["dev_metrics"]} if metadata.get("dev_metrics") else {}
    return Card(
        kind="LoRA adapter", base_model=metadata.get("base_model"), tasks=[task], inits={task: metadata["init"]},
        method=f"fine-tuned with transformers.Trainer: {metadata['steps']} steps, train loss "
               f"{metadata['train_loss']:.4g}",
        hyperparameters=_flat({"seed": metadata.get("seed"), "lora": metadata.get("lora"),
                               "training": metadata.get("training"),
                               "subspace": {k: subspace[k] for k in ("variant", "others") if k in subspace}}),
        scores=scores, scores_note="" if scores else "No dev split: not measured.",
    )


def merge_card(result: dict[str, Any], records: dict[str, dict], written_method: str) -> Card:
    """The card of a merge: `result` is what `osrm-lora merge --json` prints; `records` each adapter's
    osrm_lora.json ({} for adapters trained elsewhere), whose dev scores are shown as those of each adapter alone."""
    method = result["method"]
    full = "files" in result
    export = {k: result.get(k) for k in ("rank", "task", "heads_from", "exact", "discarded_fraction")}
    scores = {f"{task} adapter alone": r["dev_metrics"] for task, r in records.items() if r.get("dev_metrics")}
    note = ("The merged model's own scores are not measured by `osrm-lora merge` (`osrm-lora eval` measures them)"
            + ("; the rows are each adapter's dev scores, recorded when it was trained." if scores else "."))
    return Card(
        kind="merged full model" if full else "merged LoRA adapter",
        base_model=result.get("base_model") or result.get("base_checkpoint"), tasks=list(result["tasks"]),
        inits={task: records.get(task, {}).get("init") for task in result["tasks"]},
        method=method if written_method == method else f"{method} (mergekit merge_method: {written_method})",
        hyperparameters=_flat({**result["params"], "export": {k: v for k, v in export.items() if v is not None}}),
        scores=scores, scores_note=note, library="transformers" if full else "peft",
    )

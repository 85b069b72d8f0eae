"""Safe, atomic file I/O shared by every module that writes results or reads tensors.

Every output is staged next to its target and renamed into place, so a crash leaves either the old output or
the new one, never half of one. An existing path is replaced only when it is an osrm-lora output of the same
kind (a folder's `.osrm-lora-output.json` marker, a file's recorded `format`), or with `overwrite=True`; even
then never an input of the same command, a file by a folder (or the reverse), a read-only path, the current
directory or a filesystem root. Staging names carry their writer's host and pid, so concurrent writers never
collide and a killed writer's leftovers are cleaned (or reported) by the next write. Outputs honour the umask.
Tensors go through safetensors only (no pickle), and a file holding NaN/Inf is refused on load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from . import __version__
from .errors import OsrmLoraError

if TYPE_CHECKING:
    import torch

MARKER_NAME = ".osrm-lora-output.json"
MARKER_FORMAT = "osrm-lora/output/1"
STALE_AFTER_S = 3600.0  # staging left by another host (or an older version) is removed after this long
_NAME_CHARS = 120  # of the target's name kept in staging names, so they stay under the 255-byte limit
_COMMIT_TRIES = 1000  # renames tried against concurrent writers of the same path before giving up
_HEADER_LIMIT = 100 << 20  # largest safetensors header (bytes) read to find a file's recorded format
_JSON_LIMIT = 16 << 20  # largest JSON file read to find its recorded format


class OsrmFileError(OsrmLoraError):
    """A file that cannot be used: missing, truncated, foreign or mismatched. The message names the file."""


class OutputError(OsrmLoraError):
    """An output path that may not be written; the message names it, says why, and if --overwrite helps."""


class NonFiniteError(OsrmFileError):
    """A tensor file holding NaN or Inf; the message names the file and the tensor (its module)."""


class StaleStagingWarning(UserWarning):
    """Staging left next to an output by an interrupted write that this write could not safely remove."""


def recorded_kind(path: str | os.PathLike) -> str | None:
    """The kind an existing osrm-lora output records: a folder's marker `kind`, or a file's `format` (the
    safetensors metadata or a JSON object's key). None for anything else, unreadable ones included."""
    path = Path(path)
    try:
        if path.is_dir():
            marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
            ok = isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT
            found = marker.get("kind") if ok else None
            return found if isinstance(found, str) else None
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if 2 <= size <= _HEADER_LIMIT and f.read(1) == b"{":
                f.seek(8)
                meta = json.loads(f.read(size)).get("__metadata__") or {}
            elif path.stat().st_size <= _JSON_LIMIT:
                f.seek(0)
                meta = json.loads(f.read())
            else:
                return None
        found = meta.get("format") if isinstance(meta, dict) else None
        return found if isinstance(found, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _writable(path: Path) -> bool:
    """Whether its mode lets us write `path`; root ignores modes, so: whether any write bit is set."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return bool(os.stat(path).st_mode & 0o222)
    return os.access(path, os.W_OK)


def _refusal(target: Path, kind: str | None, folder: bool, overwrite: bool,
             inputs: list[str | os.PathLike], in_place: bool) -> str | None:
    """Why `target` may not be written, or None; see `check_output`."""
    if target == Path(target.anchor):
        return "is a filesystem root; choose a new folder for the output"
    if not in_place and Path.cwd().resolve().is_relative_to(target):
        return "is or contains the current directory; choose a new folder for the output"
    for given in inputs:
        source = Path(os.path.realpath(given))
        if target == source or (target.exists() and source.exists() and os.path.samefile(target, source)):
            return f"is {given}, an input of this command"
        if source.is_relative_to(target):
            return f"contains {given}, an input of this command"
        if target.is_relative_to(source):
            return f"is inside {given}, an input of this command"
    parent = next(p for p in target.parents if p.exists())
    if not parent.is_dir() or not _writable(parent):
        state = "read-only" if parent.is_dir() else "not a folder"
        return f"{parent} is {state}, so nothing can be written there"
    existing = _settled(target)
    if existing is None:
        return None
    mode, writable, found, empty = existing
    what, wanted = ("folder" if stat.S_ISDIR(mode) else "file"), ("folder" if folder else "file")
    if what != wanted:
        return f"is a {what}; a {wanted} output never replaces it, even with --overwrite"
    if not writable:
        return f"is read-only (mode {mode & 0o777:04o}); it is never replaced"
    if overwrite or found == kind or (kind is None and not folder) or empty:
        return None  # (an empty folder loses nothing)
    held = f"is an osrm-lora {found!r} output, not {kind!r}" if found else f"is no osrm-lora {kind!r} output"
    return f"exists and {held}; use --overwrite (overwrite=True) to replace it"


def _settled(target: Path) -> tuple[int, bool, str | None, bool] | None:
    """(mode, writable, recorded kind, is an empty folder) of what is at `target`, or None when nothing is.
    Read again while a concurrent writer swaps it: one output's mode is never paired with another's kind."""
    for _ in range(_COMMIT_TRIES):
        try:
            before = os.stat(target)
            writable = _writable(target)
            found = recorded_kind(target)
            empty = stat.S_ISDIR(before.st_mode) and _is_empty(target)
            after = os.stat(target)
        except FileNotFoundError:
            if not os.path.lexists(target):
                return None
            continue
        if (before.st_ino, before.st_dev) == (after.st_ino, after.st_dev):
            return after.st_mode, writable, found, empty
    raise OutputError(f"{target}: replaced by other writers too often to be checked")


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def check_output(path: str | os.PathLike, kind: str | None, *, folder: bool, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), in_place: bool = False) -> Path:
    """Refuse to write `path` unless it is absent, an empty folder, or an osrm-lora output of `kind`
    (`kind=None`: a library-internal file, replaced whatever it holds); anything else needs `overwrite`.
    Never allowed: a filesystem root, the current directory (or a folder holding it), a path that is, holds
    or lies inside one of `inputs`, a file where a folder goes (or the reverse), a read-only path or folder.
    `in_place`: the folder is written into, never replaced (`claim_output_dir`), so it may hold the current
    directory. Returns the path to write, symbolic links resolved; raises OutputError naming `path` and why."""
    shown = Path(path)
    target = Path(os.path.realpath(shown))
    reason = _refusal(target, kind, folder, overwrite, list(inputs), in_place)
    if reason is not None:
        raise OutputError(f"{shown}: {reason}")
    return target


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone would, racily)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "host"


def _staging_prefix(target: Path) -> str:
    """`.NAME.HOST.PID.`: the writer of a leftover staging path is known from its name."""
    return f".{target.name[:_NAME_CHARS]}.{_host()}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # another user's process, or no valid pid: never treat it as dead
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale_staging(target: Path) -> None:
    """Remove the staging paths of `target` that a killed writer left: this host's with a dead pid, others
    (another host, older versions) once older than STALE_AFTER_S; warn about the younger foreign ones."""
    name = target.name[:_NAME_CHARS]
    ours = re.compile(rf"\.{re.escape(name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(tmp|old)")
    legacy = re.compile(rf"\.{re.escape(name)}\.([a-z0-9_]{{8}}\.tmp|old)")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(f".{name}."):
            continue
        match = ours.fullmatch(entry.name)
        if match and match["host"] == _host():
            pid = int(match["pid"])
            if pid != os.getpid() and not _pid_alive(pid):
                _remove(entry)
        elif match or legacy.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - entry.lstat().st_mtime > STALE_AFTER_S:
                    _remove(entry)
                else:
                    warnings.warn(f"{entry}: staging of an interrupted or concurrent write of {target}; "
                                  "remove it once no other osrm-lora process writes there",
                                  StaleStagingWarning, stacklevel=2)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = None, *, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging path next to `path`; it replaces `path` only if the block succeeds. `kind` is the
    `format` the file records (None: a library-internal file); see `check_output` for what is refused."""
    inputs = list(inputs)
    target = check_output(path, kind, folder=False, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(target)
    fd, name = tempfile.mkstemp(prefix=_staging_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        check_output(path, kind, folder=False, overwrite=overwrite, inputs=inputs)  # what is there now
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging folder next to `path`; it replaces `path`, marked as an output of `kind`, only if the
    block succeeds. See `check_output` for what is refused."""
    inputs = list(inputs)
    target = check_output(path, kind, folder=True, overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _write_marker(tmp, kind)
        os.chmod(tmp, 0o777 & ~_umask())
        _commit_dir(tmp, target, lambda: check_output(path, kind, folder=True, overwrite=overwrite,
                                                      inputs=inputs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, kind: str) -> None:
    marker = {"format": MARKER_FORMAT, "kind": kind, "version": __version__}
    (folder / MARKER_NAME).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")


def _commit_dir(tmp: Path, target: Path, check: Callable[[], object]) -> None:
    """Rename `tmp` onto `target`, first moving what is there away (after `check` allows replacing it).

    Concurrent writers may each put a complete output in between; whichever rename lands last wins, and
    every output moved away is deleted by the writer that moved it.
    """
    moved: list[Path] = []
    try:
        for _ in range(_COMMIT_TRIES):
            try:
                os.rename(tmp, target)  # works when target is absent (or an empty folder)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            check()
            old = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=".old", dir=target.parent))
            try:
                os.rename(target, old)
                moved.append(old)
            except FileNotFoundError:
                old.rmdir()
        raise OutputError(f"{target}: still replaced by other writers after {_COMMIT_TRIES} tries")
    finally:
        for old in moved:
            _remove(old)


def claim_output_dir(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Create (or reuse) a folder written in place over time, such as an experiment's, marked as `kind`.

    The same rules as `atomic_dir` decide whether `path` may be used, except that it may be (or hold) the
    current directory; `overwrite` lets an existing folder of another kind be written into (as the
    Trainer's `overwrite_output_dir`): nothing in it is deleted.
    """
    target = check_output(path, kind, folder=True, overwrite=overwrite, inputs=inputs, in_place=True)
    target.mkdir(parents=True, exist_ok=True)
    if recorded_kind(target) != kind:
        _write_marker(target, kind)
    return target


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write a library-internal text file atomically (whatever an existing file there holds)."""
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, kind: str | None = None, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write JSON atomically; with `kind`, `obj` (a dict) records it as its `format` and only a file of the
    same format is replaced without `overwrite`."""
    if kind is not None:
        obj = {**obj, "format": kind}
    with atomic_path(path, kind, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                 overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Save contiguous CPU tensors with string metadata, atomically; metadata `format` is the file's kind."""
    from safetensors.torch import save_file  # imports torch: only tensor files need it, not JSON and reports

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path, metadata.get("format"), overwrite=overwrite, inputs=inputs) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf in any floating tensor; the error names `source` (the file) and the tensor's key."""
    import torch

    for key, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{source}: tensor {key} holds {bad} non-finite value(s) (NaN/Inf) of {tensor.numel()}"
            )


def load_tensors(
    path: str | os.PathLike, expected_format: str | None = None, kind: str = "tensor", *, finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata; a missing, truncated or foreign file is an OsrmFileError.

    With `expected_format`, a file whose metadata `format` differs (another tool's file, another kind of ours)
    is refused too, naming `kind` ("statistics", "subspace", ...). NaN/Inf are refused (`check_finite`)
    unless `finite=False`, for a caller that checks them itself under better names.
    """
    path = Path(path)
    if not path.is_file():
        raise OsrmFileError(f"{path}: file not found")
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise OsrmFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if expected_format is not None and metadata.get("format") != expected_format:
        raise OsrmFileError(f"{path}: not an osrm-lora {kind} file (format={metadata.get('format')!r})")
    if finite:
        check_finite(tensors, str(path))
    return tensors, metadata


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object (config dicts, manifests)."""
    data = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]

"""io: outputs never destroy what osrm-lora did not write; concurrent, interrupted, umask-honouring writes.

Each test states a case of issue 14 §1; they run as root in CI, so read-only cases use mode bits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from osrm_lora.io import (
    MARKER_NAME,
    STALE_AFTER_S,
    OutputError,
    StaleStagingWarning,
    atomic_dir,
    atomic_path,
    check_output,
    claim_output_dir,
    recorded_kind,
    write_json,
)


def _write(path: Path, kind: str = "adapter", token: str = "new", **options) -> None:
    with atomic_dir(path, kind, **options) as tmp:
        (tmp / "a.txt").write_text(token)
        (tmp / "b.txt").write_text(token)


def _precious(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def test_an_unrelated_folder_is_never_replaced_without_overwrite(tmp_path):
    precious = _precious(tmp_path / "precious")
    with pytest.raises(OutputError, match=r"precious: exists and is no osrm-lora 'adapter' output.*--overwrite"):
        _write(precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no staging left behind
    _write(precious, overwrite=True)
    assert sorted(os.listdir(precious)) == [MARKER_NAME, "a.txt", "b.txt"]


def test_an_output_of_the_same_kind_is_replaced_and_another_kind_is_refused(tmp_path):
    out = tmp_path / "out"
    _write(out, token="first")
    assert recorded_kind(out) == "adapter"
    _write(out, token="second")
    assert (out / "a.txt").read_text() == "second"
    with pytest.raises(OutputError, match=r"is an osrm-lora 'adapter' output, not 'merged-model'"):
        _write(out, kind="merged-model")
    assert (out / "a.txt").read_text() == "second"


def test_an_empty_folder_may_be_written(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty")
    assert recorded_kind(tmp_path / "empty") == "adapter"


@pytest.mark.parametrize("relation", ["same", "same-by-other-spelling", "contains", "inside"])
def test_an_input_is_never_written_even_with_overwrite(tmp_path, monkeypatch, relation):
    adapter = tmp_path / "adapters" / "b"
    _write(adapter, token="input")
    monkeypatch.chdir(tmp_path / "adapters")
    target, given = {
        "same": (adapter, adapter),
        "same-by-other-spelling": (Path("b"), adapter),  # relative vs absolute
        "contains": (tmp_path / "adapters", Path("b")),
        "inside": (adapter / "merged", adapter),
    }[relation]
    if relation == "contains":
        monkeypatch.chdir(tmp_path)
        given = Path("adapters/b")
    with pytest.raises(OutputError, match="an input of this command"):
        _write(target, overwrite=True, inputs=[given])
    assert (adapter / "a.txt").read_text() == "input"


def test_an_input_reached_through_a_symlink_is_still_an_input(tmp_path):
    _write(tmp_path / "real", token="input")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="an input"):
        _write(tmp_path / "link", overwrite=True, inputs=[tmp_path / "real"])


def test_writing_through_a_symlink_replaces_its_destination_and_keeps_the_link(tmp_path):
    _write(tmp_path / "real", token="old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _write(tmp_path / "link", token="new")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.txt").read_text() == "new"


def test_a_file_is_never_replaced_by_a_folder_nor_a_folder_by_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="is a file; a folder output never replaces it"):
        _write(tmp_path / "notes.txt", overwrite=True)
    _precious(tmp_path / "folder")
    with pytest.raises(OutputError, match="is a folder; a file output never replaces it"):
        write_json(tmp_path / "folder", {"a": 1}, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "folder" / "thesis.tex").is_file()


def test_read_only_targets_and_folders_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    _write(out, token="old")
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=r"out: is read-only \(mode 0555\)"):
            _write(out, overwrite=True)
    finally:
        out.chmod(0o755)
    assert (out / "a.txt").read_text() == "old"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="locked is read-only, so nothing can be written there"):
            write_json(locked / "r.json", {"a": 1})
    finally:
        locked.chmod(0o755)
    (tmp_path / "r.json").write_text("{}")
    (tmp_path / "r.json").chmod(0o444)
    with pytest.raises(OutputError, match="is read-only"):
        write_json(tmp_path / "r.json", {"a": 1}, overwrite=True)


def test_the_current_directory_its_parents_and_a_root_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    _write(work)
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), "/"):
        with pytest.raises(OutputError, match="current directory|filesystem root"):
            _write(Path(target), overwrite=True)
    assert (work / "a.txt").is_file()


def test_a_failed_write_keeps_the_old_output_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    _write(out, token="old")
    with pytest.raises(RuntimeError), atomic_dir(out, "adapter") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_outputs_are_identified_by_their_recorded_format(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "r.json"
    write_json(path, {"score": 1}, kind="osrm-lora/eval/1")
    assert recorded_kind(path) == json.loads(path.read_text())["format"] == "osrm-lora/eval/1"
    write_json(path, {"score": 2}, kind="osrm-lora/eval/1")  # same kind: replaced
    with pytest.raises(OutputError, match="'osrm-lora/eval/1' output, not 'osrm-lora/other/1'"):
        write_json(path, {"score": 3}, kind="osrm-lora/other/1")
    weights = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(weights), metadata={"format": "pt"})
    assert recorded_kind(weights) == "pt"
    with pytest.raises(OutputError, match="'pt' output, not 'osrm-lora/task-stats/1'"), \
            atomic_path(weights, "osrm-lora/task-stats/1"):
        pass
    assert recorded_kind(weights) == "pt"


def test_library_internal_files_are_replaced_whatever_they_hold(tmp_path):
    (tmp_path / "manifest.json").write_text("not json")
    write_json(tmp_path / "manifest.json", {"a": 1})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _write(tmp_path / "out")
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_dir(tmp_path / "nested", "adapter") as tmp:
            write_json(tmp / "inner.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "nested" / "inner.json").stat().st_mode & 0o777 == 0o640
    os.umask(0o022)
    try:
        _write(tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755


def _assert_one_complete_output(out: Path) -> None:
    tokens = {(out / "a.txt").read_text(), (out / "b.txt").read_text()}
    assert len(tokens) == 1 and recorded_kind(out) == "adapter"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_concurrent_saves_to_one_path_from_threads_all_succeed(tmp_path):
    out, errors = tmp_path / "h", []

    def writer(i: int) -> None:
        try:
            for j in range(50):
                _write(out, token=f"{i}-{j}")
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_one_complete_output(out)


WRITER = """
import sys
from pathlib import Path
from osrm_lora.io import atomic_dir
for j in range(40):
    with atomic_dir(Path(sys.argv[1]), "adapter") as tmp:
        (tmp / "a.txt").write_text(f"{sys.argv[2]}-{j}")
        (tmp / "b.txt").write_text(f"{sys.argv[2]}-{j}")
"""


def test_concurrent_saves_to_one_path_from_processes_all_succeed(tmp_path):
    out = tmp_path / "h"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert results == [(0, "")] * 4
    _assert_one_complete_output(out)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_left_by_a_killed_writer_is_cleaned_on_the_next_write(tmp_path):
    host = socket.gethostname().split(".")[0]
    dead = tmp_path / f".out.{host}.{_dead_pid()}.abcd1234.tmp"
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.{host}.{live_writer.pid}.efgh5678.tmp"
        live.mkdir()
        old_foreign = tmp_path / ".out.otherhost.12.ijkl9012.tmp"
        old_foreign.mkdir()
        os.utime(old_foreign, (time.time() - STALE_AFTER_S - 60,) * 2)
        legacy = tmp_path / ".out.old"  # what the old atomic_dir left when killed
        legacy.mkdir()
        with pytest.warns(StaleStagingWarning, match=r"\.out\.old: staging of an interrupted or concurrent"):
            _write(tmp_path / "out")
        assert not dead.exists() and not old_foreign.exists()
        assert live.exists() and legacy.exists()  # a live writer's, and a young one that may still be in use
    finally:
        live_writer.kill()
        live_writer.wait()


def test_claimed_folders_are_written_in_place_and_never_emptied(tmp_path):
    exp = claim_output_dir(tmp_path / "exp", "experiment")
    (exp / "cache.bin").write_text("hours of compute")
    assert claim_output_dir(tmp_path / "exp", "experiment") == exp and (exp / "cache.bin").is_file()
    with pytest.raises(OutputError, match="'experiment' output, not 'report'"):
        claim_output_dir(exp, "report")
    precious = _precious(tmp_path / "precious")
    with pytest.raises(OutputError, match="--overwrite"):
        claim_output_dir(precious, "experiment")
    claim_output_dir(precious, "experiment", overwrite=True)
    assert (precious / "thesis.tex").is_file() and recorded_kind(precious) == "experiment"


def test_a_claimed_folder_may_be_the_current_directory(tmp_path, monkeypatch):
    claim_output_dir(tmp_path / "exp", "experiment")
    monkeypatch.chdir(tmp_path / "exp")
    assert claim_output_dir(".", "experiment") == (tmp_path / "exp").resolve()
    with pytest.raises(OutputError, match="current directory"):
        _write(Path("."), kind="experiment")


def test_check_output_returns_the_resolved_target_for_an_absent_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output("new/out", "adapter", folder=True) == tmp_path.resolve() / "new" / "out"

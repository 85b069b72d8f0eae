"""Reading data rows with a tolerance for a few malformed ones.

Real corpora have the odd broken line. A loader skips such rows and says so (how many, which lines); when
more than 1% of a file is broken the file is probably read with the wrong layout, so that is an error.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import OsrmLoraError
from ..io import OsrmFileError

MAX_MALFORMED_FRACTION = 0.01
SHOWN_LINES = 5

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class MalformedRowsWarning(UserWarning):
    """Some rows of a data file were skipped; the message names the file, the count and the first lines."""


class BadRow(OsrmLoraError):
    """Raised by a row parser: the row is skipped and counted."""


def parse_rows(
    where: str, rows: Iterable[tuple[int, Any]], parse: Callable[[Any], dict]
) -> list[dict]:
    """Apply `parse` to each (line number, raw row); skip rows it rejects with BadRow, then warn or fail."""
    records: list[dict] = []
    bad: list[tuple[int, str]] = []
    for line, raw in rows:
        try:
            if isinstance(raw, Exception):  # a line the csv/json reader itself could not decode
                raise BadRow(str(raw))
            records.append(parse(raw))
        except BadRow as exc:
            bad.append((line, str(exc)))
    total = len(records) + len(bad)
    if total == 0:
        raise OsrmFileError(f"{where}: no data rows")
    if bad:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in bad[:SHOWN_LINES])
        message = f"{where}: {len(bad)} of {total} rows malformed ({shown}{'; ...' if len(bad) > SHOWN_LINES else ''})"
        if len(bad) > MAX_MALFORMED_FRACTION * total:
            raise OsrmFileError(f"{message}; more than {MAX_MALFORMED_FRACTION:.0%} malformed, check the file layout")
        warnings.warn(f"{message}; skipped", MalformedRowsWarning, stacklevel=3)
    return records


def open_text(path: Path, what: str) -> io.TextIOBase:
    """Open a UTF-8 text file (a BOM is dropped); a missing file is an error naming it."""
    if not path.is_file():
        raise OsrmFileError(f"{what}: file not found: {path}")
    return open(path, encoding="utf-8-sig", newline="")


def delimited_rows(text: Iterable[str], delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """(line number of the row's first line, fields) for every non-blank row, header included."""
    reader = csv.reader(text, delimiter=delimiter, quoting=quoting, strict=quoting != csv.QUOTE_NONE)
    line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, exc  # type: ignore[misc]  # parse_rows counts it as malformed
            line = reader.line_num + 1
            continue
        if fields and any(f.strip() for f in fields):
            yield line, fields
        line = reader.line_num + 1


def jsonl_rows(text: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object or the JSON error) for every non-blank line."""
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, exc


def require_text(value: Any, name: str) -> str:
    """A non-empty string field (surrounding whitespace removed) or BadRow."""
    if value is None or isinstance(value, (dict, list)):
        raise BadRow(f"{name} is missing")
    text = str(value).strip()
    if not text:
        raise BadRow(f"{name} is empty")
    return text

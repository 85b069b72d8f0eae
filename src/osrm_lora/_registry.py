"""What the init and merge-method registries share: the unknown-name error, option parsing and listing.

Both register named entries with a pydantic options model; the CLI lists the options' fields and the
experiment file is validated against them before anything runs.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import RegistryError


def import_entries(package: str, skip: Callable[[str], bool] = lambda name: False) -> None:
    """Import every module of `package` whose name does not start with "_" (nor matches `skip`), so that their
    `register` calls run: a new entry is then one new module, with no list of modules to edit."""
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if not info.name.startswith("_") and not skip(info.name):
            importlib.import_module(f"{package}.{info.name}")


def unknown_name(message: str, name: str, known: Iterable[str], listing: str) -> RegistryError:
    """The error for an unregistered `name`: `message`, the closest known names, then `listing`: all of them."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return RegistryError(f"{message}; {hint}{listing}: {', '.join(known)}")


def parse_options(options: type[BaseModel], values: Mapping[str, Any], owner: str, what: str) -> Any:
    """`options` validated from `values`; the error names `owner`, each bad `what` (option) and those accepted."""
    try:
        return options(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(all)"
            if err["type"] == "extra_forbidden":
                accepted = ", ".join(options.model_fields) or "none"
                problems.append(f"unknown {what} {where!r} (accepted: {accepted})")
            else:
                problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise RegistryError(f"{owner}: " + "; ".join(problems)) from None


def describe_fields(options: type[BaseModel]) -> list[dict[str, Any]]:
    """Name, type, default and description of each field of an options model, for listings."""
    return [
        {
            "name": name,
            "type": _type_name(field.annotation),
            "default": field.get_default(call_default_factory=True),
            "description": field.description or "",
        }
        for name, field in options.model_fields.items()
    ]


def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__args__", None):
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))

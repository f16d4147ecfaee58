"""Settings from one typed source: a tree of frozen dataclasses is the whole schema.

A *settings class* is a frozen dataclass whose fields are settings (``str``, ``int``,
``bool``, ``tuple[str, ...]``) or *sections*: fields whose type is another settings class,
one level down. :class:`Schema` derives everything else from the field definitions, so a
default and a description are written once:

- the **key** of a setting: its field name with ``-`` for ``_``, or the ``key`` given to
  :func:`setting` where the name people already type differs (``memory`` for
  ``storage.memory_bytes``). Keys are unique across sections, and one key is the flag
  ``--KEY``, the environment variable ``PREFIX + KEY`` (upper case, ``_`` for ``-``) and the
  TOML key, in its section's table (``[storage]``, canonical) or flat;
- how a value is read, from the annotation: ``bool`` (true/false, 1/0, yes/no, on/off),
  ``int``, an ``int`` with ``bytes`` in its name (a size: ``4GiB``), ``tuple[str, ...]``
  (a TOML list, or comma-separated text), ``str``;
- the **help**: the attribute docstring below the field (read from the source, as
  pydantic's ``use_attribute_docstrings`` does); a setting without one is a TypeError;
- the ``--help`` texts (:meth:`Schema.add_arguments`) and the sample config file
  (:meth:`Schema.sample_toml`).

Layering (:meth:`Schema.load`): flags > environment > TOML file > defaults. Values are checked
by the classes' own ``__post_init__``; every error names the source, the key and the value.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import logging
import os
import sys
import textwrap
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar

from .sizes import format_size, parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

T = TypeVar("T")

SIZE, INT, BOOL, LIST, TEXT = "size", "int", "bool", "list", "text"
"""How a setting's value is read (its *kind*, derived from the annotation)."""


def setting(default: Any = MISSING, *, key: str = "", metavar: str = "", **kw: Any) -> Any:
    """A dataclass field that is a setting whose key or metavar is not the derived one.

    ``key``: the flag / environment / TOML name, where it differs from the field name
    (``memory`` for ``memory_bytes``). ``metavar``: the placeholder in ``--help``.
    """
    return field(default=default, metadata={"key": key, "metavar": metavar}, **kw)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a table; ValueError naming ``what`` and the file if unreadable or invalid."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML: {exc}") from None


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _parse_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _parse_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings (or a comma-separated string), got {value!r}")


_PARSERS: dict[str, Callable[[Any], Any]] = {
    SIZE: parse_size,
    INT: _parse_int,
    BOOL: _parse_bool,
    LIST: _parse_list,
    TEXT: str,
}
_METAVARS = {SIZE: "SIZE", INT: "N", BOOL: "BOOL"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> list[str]:
    """``text`` as TOML comment lines of at most 90 characters."""
    wrapped = textwrap.wrap(" ".join(text.split()), 88, break_long_words=False, break_on_hyphens=False)
    return [f"# {line}" for line in wrapped]


def attribute_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of ``cls`` (the string right below a field), one paragraph
    each; empty if its source is not installed."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - byte-code-only installs
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, as the schema derived it from its field."""

    section: str
    """the section's field name in the root (``storage``), or "" for a root setting"""
    name: str
    """the field name in its class (``memory_bytes``)"""
    key: str
    """flag, environment and TOML name (``memory``)"""
    kind: str
    """SIZE, INT, BOOL, LIST or TEXT: how its text is read"""
    metavar: str
    """its placeholder in ``--help`` (``SIZE``)"""
    help: str
    """its attribute docstring, one paragraph: ``--help`` text and sample-file comment"""
    dataclass_field: dataclasses.Field[Any]

    def __repr__(self) -> str:
        return f"<Setting {self.path} --{self.key} {self.kind}>"

    @property
    def path(self) -> str:
        """Where it is read: ``storage.memory_bytes``."""
        return f"{self.section}.{self.name}" if self.section else self.name

    def default(self) -> Any:
        f = self.dataclass_field
        return f.default_factory() if f.default is MISSING and callable(f.default_factory) else f.default

    def parse(self, raw: Any) -> Any:
        """``raw`` (text, or a TOML value) as the setting's type; ValueError if it is not one."""
        return _PARSERS[self.kind](raw)

    def shown(self, value: Any) -> Any:
        """``value`` as a person would write it in a file (a size as ``4GiB``)."""
        if self.kind == SIZE:
            return format_size(value).replace(" ", "").replace(".0", "")
        return value


def _kind(name: str, annotation: Any) -> str:
    if annotation is bool:
        return BOOL
    if annotation is int:
        return SIZE if "bytes" in name.split("_") else INT
    if annotation is str:
        return TEXT
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, ...):
        return LIST
    raise TypeError(f"setting {name}: unsupported type {annotation!r}")


class Schema(Generic[T]):
    """The settings of ``root`` (a settings class) and how they are read, shown and written.

    ``env_prefix`` starts every environment variable; ``ignored_env`` are the names after it
    that are not settings (a config file's path, test switches).
    """

    def __init__(self, root: type[T], env_prefix: str, ignored_env: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.env_prefix = env_prefix
        self.ignored_env = ignored_env

    def __repr__(self) -> str:
        return f"<Schema {self.root.__name__} {len(self.settings)} settings>"

    @cached_property
    def sections(self) -> dict[str, type]:
        """Section field name → its settings class, in declaration order."""
        hints = typing.get_type_hints(self.root)
        return {f.name: hints[f.name] for f in fields(self.root) if is_dataclass(hints[f.name])}  # type: ignore[arg-type]

    @cached_property
    def settings(self) -> tuple[Setting, ...]:
        """Every setting: the root's own, then each section's, in declaration order."""
        found: list[Setting] = []
        for section, cls in [("", self.root), *self.sections.items()]:
            hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
            for f in fields(cls):
                if section == "" and f.name in self.sections:
                    continue
                kind = _kind(f.name, hints[f.name])
                key = f.metadata.get("key") or f.name.replace("_", "-")
                metavar = f.metadata.get("metavar") or _METAVARS.get(kind) or key.upper().replace("-", "_")
                if docs and not docs.get(f.name):
                    raise TypeError(f"setting {cls.__name__}.{f.name} has no docstring")
                found.append(Setting(section, f.name, key, kind, metavar, docs.get(f.name, ""), f))
        for what in ("key", "name"):
            seen = [getattr(s, what) for s in found]
            twice = sorted({x for x in seen if seen.count(x) > 1} | (set(seen) & set(self.sections)))
            if twice:
                raise TypeError(f"{self.root.__name__}: setting {what}s must be unique, {twice} are not")
        return tuple(found)

    @cached_property
    def _by_key(self) -> dict[str, Setting]:
        return {s.key: s for s in self.settings}

    @cached_property
    def _by_name(self) -> dict[str, Setting]:
        return {s.name: s for s in self.settings}

    def env_var(self, s: Setting) -> str:
        return self.env_prefix + s.key.upper().replace("-", "_")

    def closest(self, key: str) -> str | None:
        """The key an unknown ``key`` most likely meant, if any is close."""
        close = difflib.get_close_matches(key, list(self._by_key), n=1)
        return close[0] if close else None

    def find(self, key: str, source: str) -> Setting:
        """The setting of ``key`` (``_`` read as ``-``); ValueError naming the closest if unknown."""
        norm = key.strip().replace("_", "-")
        if norm not in self._by_key:
            close = self.closest(norm)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ValueError(
                f"{source}: unknown setting {key!r}{hint}; known: {', '.join(sorted(self._by_key))}"
            )
        return self._by_key[norm]

    def default_of(self, name: str) -> Any:
        """The default of the setting whose field is ``name`` (``memory_bytes``)."""
        return self._by_name[name].default()

    # building

    def build(self, values: Mapping[Setting, Any]) -> T:
        """The root with ``values`` set and every other setting at its default."""
        top = {s.name: v for s, v in values.items() if not s.section}
        parts = {
            section: cls(**{s.name: v for s, v in values.items() if s.section == section})
            for section, cls in self.sections.items()
        }
        return self.root(**top, **parts)

    def replace(self, config: T, changes: Mapping[str, Any]) -> T:
        """``config`` with ``changes`` by field name: a section (``storage=...``) or any
        setting of the root or of a section (``disk_bytes=0``)."""
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            # A field name, or a key spelled as a name: the flat names of earlier releases
            # (``metrics_port``, ``mesh_profile``) are the keys of today's settings.
            s = self._by_name.get(name) or self._by_key.get(name.replace("_", "-"))
            if s is not None and s.section:
                parts.setdefault(s.section, {})[s.name] = value
            elif s is not None:
                top[s.name] = value
            elif name in self.sections:
                top[name] = value
            else:
                raise TypeError(f"{self.root.__name__} has no setting or section {name!r}")
        for section, section_changes in parts.items():
            top[section] = replace(top.get(section, getattr(config, section)), **section_changes)
        return replace(config, **top)  # type: ignore[type-var]

    # reading

    def file_values(self, table: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Raw values by key from a TOML document: its sections (``[storage]``) and flat keys.
        A document with a ``[node]`` table (as earlier releases wrote them, and files shared
        with other programs) is read from that table only: its keys and its ``[node.storage]``
        style sections; the rest of the file belongs to someone else."""
        out: dict[str, Any] = {}
        node = table.get("node")
        items = list((node if isinstance(node, dict) else table).items())
        for key, raw in items:
            if key in self.sections and isinstance(raw, dict):
                for inner, value in raw.items():
                    s = self.find(inner, f"{source} [{key}]")
                    if s.section != key:
                        where = f"in [{s.section}]" if s.section else "at the top, before any [section]"
                        raise ValueError(f"{source} [{key}]: {s.key!r} belongs {where}")
                    self._put(out, s, value, source)
            else:
                self._put(out, self.find(key, source), raw, source)
        return out

    @staticmethod
    def _put(out: dict[str, Any], s: Setting, raw: Any, source: str) -> None:
        if s.key in out:
            raise ValueError(f"{source}: {s.key!r} is set twice (in its section and flat?); keep one")
        out[s.key] = raw

    def flag_values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Raw values by key of the flags given on a command line parsed with :meth:`add_arguments`."""
        out = {}
        for s in self.settings:
            value = getattr(args, s.key, None)
            if value is not None:
                out[s.key] = ",".join(value) if s.kind == LIST else value
        return out

    def load(
        self,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        overrides_from: str = "--",
    ) -> T:
        """Defaults < TOML file < environment (``None``: ``os.environ``) < ``overrides`` (flags, by key).

        Raises ValueError naming the source, the key and the bad value.
        """
        values: dict[Setting, Any] = {}
        sources: dict[Setting, str] = {}

        def apply(source: str, s: Setting, raw: Any) -> None:
            sources[s] = source
            try:
                values[s] = s.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: bad value for {s.key!r}: {exc}") from exc

        if config_file is not None:
            source = f"config file {config_file}"
            for key, raw in self.file_values(read_toml(config_file, "config file"), source).items():
                apply(source, self._by_key[key], raw)
        for var, raw in (os.environ if env is None else env).items():
            if not var.startswith(self.env_prefix) or var[len(self.env_prefix) :] in self.ignored_env:
                continue
            key = var[len(self.env_prefix) :].lower().replace("_", "-")
            if key not in self._by_key:
                # The environment is ambient (orchestrators add variables of their own,
                # e.g. Kubernetes service links): warn, where a file or a flag would fail.
                close = self.closest(key)
                hint = f" (did you mean {self.env_var(self._by_key[close])}?)" if close else ""
                log.warning("ignoring unknown environment variable %s%s", var, hint)
                continue
            apply(f"environment {var}", self._by_key[key], raw)
        for key, raw in (overrides or {}).items():
            apply(f"{overrides_from}{key}", self.find(key, f"{overrides_from}{key}"), raw)
        try:
            return self.build(values)
        except ValueError as exc:
            # The sections check their fields by path (``mesh.replicas``): say where it was set.
            where = next((src for s, src in sources.items() if str(exc).startswith(s.path + " ")), None)
            raise ValueError(f"invalid configuration: {exc}" + (f" (from {where})" if where else "")) from exc

    def from_text(self, key: str, raw: str) -> tuple[str, Any]:
        """``(key, value)`` for ``KEY=VALUE`` as typed on a command line, for a config file.

        Text is taken as the setting's type reads it, never as a bare TOML value (which would
        turn ``2024#prod`` into 2024, ``0x1F`` into 31 or ``true`` into a boolean name):
        integers and booleans become TOML integers and booleans, everything else stays text as
        typed (a size as ``4GiB``); a value starting with a quote or ``[`` is TOML (a quoted
        string, a list). ValueError if the setting is unknown or the value is not one it takes.
        """
        s = self.find(key, f"--set {key}")
        text = raw.strip()
        value: Any = text
        if text[:1] in ("'", '"', "["):
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"--set {s.key}: {text!r:.60} is not a TOML string or list: {exc}") from None
        try:
            parsed = s.parse(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--set {s.key}: bad value for {s.key!r}: {exc}") from None
        return s.key, parsed if s.kind in (INT, BOOL) else value

    # writing

    def sample_toml(self, header: str, values: Mapping[str, Any] | None = None) -> str:
        """A config file documenting every setting under its section: ``values`` (by key) are
        set, every other setting is shown commented out at its default. ``header`` opens it."""
        values = {self.find(k, "sample").key: v for k, v in (values or {}).items()}
        lines = [f"# {line}".rstrip() for line in header.splitlines()]
        for section in ["", *self.sections]:
            if section:
                lines += ["", f"[{section}]"]
                lines += _comment(inspect.cleandoc(self.sections[section].__doc__ or ""))
            for s in (s for s in self.settings if s.section == section):
                lines.append("")
                lines += _comment(s.help)
                if s.key in values:
                    lines.append(f"{s.key} = {_toml_value(values[s.key])}")
                else:
                    lines.append(f"# {s.key} = {_toml_value(s.shown(s.default()))}")
        text = "\n".join(lines) + "\n"
        # a file that would not load is not written: check what `run --config` will read
        self.load(env={}, overrides=self.file_values(tomllib.loads(text), "sample"), overrides_from="--set ")
        return text

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """A ``--KEY`` flag per setting, its help the setting's docstring, its default and its
        environment variable, grouped by section. A list flag may be repeated; ``--BOOL`` alone
        means true."""
        groups: dict[str, Any] = {"": parser}
        for section, cls in self.sections.items():
            doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split())
            title = f"{section} settings ([{section}] in a config file)"
            groups[section] = parser.add_argument_group(title, doc.replace("%", "%%"))
        for s in self.settings:
            default = s.default()
            if s.kind == SIZE:
                default = format_size(default)
            elif s.kind == LIST:
                default = " ".join(default)
            elif s.kind == BOOL:
                default = _toml_value(default)
            # an empty default means "none" or is explained by the help text itself
            shown = f"default: {default}; " if default != "" else ""
            repeat = "repeat or comma-separate; " if s.kind == LIST else ""
            kwargs: dict[str, Any] = {
                "dest": s.key,
                "metavar": s.metavar,
                "help": f"{s.help} ({repeat}{shown}env {self.env_var(s)})".replace("%", "%%"),
            }
            if s.kind == LIST:
                kwargs["action"] = "append"
            if s.kind == BOOL:
                kwargs["nargs"] = "?"
                kwargs["const"] = "true"
            groups[s.section].add_argument(f"--{s.key}", **kwargs)

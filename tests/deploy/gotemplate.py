"""A small renderer for the Go-template subset our Helm chart uses (no ``helm`` binary here).

Supported: ``{{ }}`` actions with ``{{-``/``-}}`` trimming; ``define``, ``include``; ``if``/
``else``/``end``; ``range`` over a list (``.`` is the element); pipelines of ``quote``,
``nindent N``, ``indent N``, ``toYaml``, ``not``, ``default D``; operands ``.``, ``.Values.a.b``,
``.Release.X``, ``.Chart.X``, strings and integers. A field that does not exist is an error
(Helm would print ``<no value>``), so a typo in a template fails the test rather than the
cluster. Anything else raises: the chart must stay inside this subset.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with trim markers applied to the text around."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(text):
        chunk = text[pos : m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        out.append(("text", chunk))
        out.append(("action", m.group(2)))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = text[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Any], int, str]:
    """Nodes until one of ``stop`` keywords; returns (nodes, next index, the keyword met)."""
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop:
            return nodes, i, word
        if word in ("if", "range"):
            body, i, met = _parse(tokens, i, ("else", "end"))
            other: list[Any] = []
            if met == "else":
                other, i, _ = _parse(tokens, i, ("end",))
            nodes.append((word, value[len(word) :].strip(), body, other))
        elif word == "define":
            body, i, _ = _parse(tokens, i, ("end",))
            nodes.append(("define", shlex.split(value)[1], body))
        else:
            nodes.append(("expr", value))
    if stop:
        raise TemplateError(f"missing {{{{ end }}}} (expected one of {stop})")
    return nodes, i, ""


class Renderer:
    def __init__(self, values: dict[str, Any], release: dict[str, Any], chart: dict[str, Any]) -> None:
        self.root = {"Values": values, "Release": release, "Chart": chart}
        self.defines: dict[str, list[Any]] = {}

    def load_helpers(self, text: str) -> None:
        self._render(_parse(_tokens(text), 0, ())[0], self.root)

    def render(self, text: str) -> str:
        return self._render(_parse(_tokens(text), 0, ())[0], self.root)

    def _render(self, nodes: list[Any], dot: Any) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "define":
                self.defines[node[1]] = node[2]
            elif kind == "expr":
                out.append(_text(self._pipeline(node[1], dot)))
            elif kind == "if":
                out.append(self._render(node[2] if bool(self._pipeline(node[1], dot)) else node[3], dot))
            elif kind == "range":
                items = self._pipeline(node[1], dot) or []
                out.append(
                    "".join(self._render(node[2], item) for item in items) or self._render(node[3], dot)
                )
        return "".join(out)

    def _pipeline(self, expr: str, dot: Any) -> Any:
        value: Any = None
        for n, command in enumerate(part.strip() for part in _split_pipes(expr)):
            words = shlex.split(command, posix=False)
            args = [self._operand(w, dot) for w in words[1:]]
            if n > 0:
                args.append(value)
            value = self._call(words[0], args, dot) if _is_func(words[0]) else self._operand(words[0], dot)
        return value

    def _call(self, name: str, args: list[Any], dot: Any) -> Any:
        if name == "include":
            return self._render(self.defines[args[0]], args[1])
        if name == "quote":
            return '"' + _text(args[0]).replace('"', '\\"') + '"'
        if name in ("nindent", "indent"):
            pad = " " * int(args[0])
            body = "\n".join(pad + line if line else line for line in _text(args[1]).splitlines())
            return ("\n" if name == "nindent" else "") + body
        if name == "toYaml":
            return yaml.safe_dump(args[0], default_flow_style=False, sort_keys=False).rstrip("\n")
        if name == "not":
            return not bool(args[0])
        if name == "default":
            return args[1] if bool(args[1]) else args[0]
        if name == "fail":
            raise TemplateError(f"fail: {args[0]}")
        raise TemplateError(f"function {name!r} is outside the supported subset")

    def _operand(self, word: str, dot: Any) -> Any:
        if word == ".":
            return dot
        if word.startswith('"'):
            return shlex.split(word)[0]
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word.startswith("."):
            value = dot
            for part in word[1:].split("."):
                if not isinstance(value, dict) or part not in value:
                    raise TemplateError(f"{word}: no field {part!r}")
                value = value[part]
            return value
        raise TemplateError(f"operand {word!r} is outside the supported subset")


FUNCS = ("include", "quote", "nindent", "indent", "toYaml", "not", "default", "fail")


def _is_func(word: str) -> bool:
    return word in FUNCS


def _split_pipes(expr: str) -> list[str]:
    parts, current, quoted = [], "", False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        if ch == "|" and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

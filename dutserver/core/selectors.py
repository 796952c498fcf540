"""Selectors: which agents a job goes to, by name, labels and facts. One grammar for the web,
dutctl and the API.

    room=204,os=windows        every term must hold (a comma is AND)
    role in (build,test)       one of several values;  role notin (build,test)
    name=pc-1*                 * and ? match any characters / one character
    os!=windows                not equal (also true when the agent has no `os`)
    retired  /  !retired       has the label or fact (and it is not "false", "0", "no") / has not

A key is looked up in the agent's labels first, then in its facts (`os`, `arch`, `hostname`,
`agent_version`, an RDFM device's `rdfm.hardware.devtype` …); `name` is the agent's name.
Values compare as text, case-insensitively (Windows and windows are one OS to an admin).
A malformed selector is refused with the position and the part that is wrong.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from dutserver.core.errors import ApiError

_KEY = r"[A-Za-z0-9_./-]+"
_VALUE = r'"[^"]*"|[^,()\s!="]+'  # quoted when it holds spaces or commas: os="windows 11"
_TERM = re.compile(
    rf"\s*(?:(?P<neg>!)\s*(?P<nkey>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:(?P<op>!=|=)\s*(?P<value>{_VALUE})"
    rf"|(?P<set>in|notin)\s*\(\s*(?P<values>(?:{_VALUE})(?:\s*,\s*(?:{_VALUE}))*)\s*\))?)\s*")
MAX_LENGTH = 2000
_FALSE = frozenset({"", "false", "0", "no", "off"})


@dataclass(frozen=True, slots=True)
class Term:
    key: str
    op: str  # "=", "!=", "in", "notin", "has", "hasnot"
    values: tuple[str, ...] = ()

    def holds(self, name: str, labels: Mapping[str, object], facts: Mapping[str, object]) -> bool:
        if self.key == "name":
            actual: object = name
        elif self.key in labels:
            actual = labels[self.key]
        else:
            actual = facts.get(self.key)
        if self.op in ("has", "hasnot"):
            present = actual is not None and str(actual).lower() not in _FALSE
            return present if self.op == "has" else not present
        text = None if actual is None else str(actual).lower()
        matched = text is not None and any(_match(text, v) for v in self.values)
        return matched if self.op in ("=", "in") else not matched


def _match(text: str, pattern: str) -> bool:
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(text, pattern)
    return text == pattern


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    terms: tuple[Term, ...]

    def matches(self, name: str, labels: Mapping[str, object],
                facts: Mapping[str, object]) -> bool:
        return all(t.holds(name, labels, facts) for t in self.terms)


def parse(text: object) -> Selector:
    """The selector in text, or 400 naming where it goes wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "Invalid selector: empty (e.g. room=204,os=windows)")
    if len(text) > MAX_LENGTH:
        raise ApiError(400, f"Invalid selector: longer than {MAX_LENGTH} characters")
    terms: list[Term] = []
    at = 0
    while True:
        m = _TERM.match(text, at)
        if m is None or m.end() == at:
            raise _bad(text, at, "expected key=value, key!=value, key in (a,b), key or !key")
        if m.group("neg"):
            terms.append(Term(m.group("nkey"), "hasnot"))
        elif m.group("op"):
            terms.append(Term(m.group("key"), m.group("op"), (_unquote(m.group("value")),)))
        elif m.group("set"):
            values = tuple(_unquote(v) for v in re.findall(_VALUE, m.group("values")))
            terms.append(Term(m.group("key"), m.group("set"), values))
        else:
            terms.append(Term(m.group("key"), "has"))
        at = m.end()
        if at == len(text):
            return Selector(text, tuple(terms))
        if text[at] != ",":
            rest = text[at:]
            why = ("a value is missing (quote one with spaces: os=\"windows 11\")"
                   if rest.startswith(("=", "!=")) else
                   "in (…) needs one or more values: role in (build,test)"
                   if re.match(r"(not)?in\s*\(", rest) else "expected a comma between terms")
            raise _bad(text, at, why)
        at += 1


def _unquote(value: str) -> str:
    value = value.strip()
    return (value[1:-1] if value.startswith('"') else value).lower()


def _bad(text: str, at: int, why: str) -> ApiError:
    part = text[at:at + 20]
    return ApiError(400, f"Invalid selector at character {at + 1} ({part!r}): {why}")

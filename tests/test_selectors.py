"""Selectors (core/selectors.py): the grammar's examples as the docs give them, the errors
that point at the bad part, and any text at all either parses or is a 400 (never a crash)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dutserver.core.errors import ApiError
from dutserver.core.selectors import parse

FLEET = {
    "pc-1": ({"room": "204", "role": "build"}, {"os": "Windows", "arch": "x86_64"}),
    "pc-17": ({"room": "204"}, {"os": "Linux", "os_version": "Debian 12"}),
    "lab-01": ({"room": "101", "retired": "true"}, {"os": "windows 11 pro"}),
    "rdfm-aa": ({}, {"rdfm.hardware.devtype": "imx8", "os": "Linux"}),
}


def chosen(text: str) -> list[str]:
    selector = parse(text)
    return sorted(n for n, (labels, facts) in FLEET.items()
                  if selector.matches(n, labels, facts))


@pytest.mark.parametrize("text, names", [
    ("room=204,os=windows", ["pc-1"]),  # case-insensitive values
    ("room=204", ["pc-1", "pc-17"]),
    ("role in (build,test)", ["pc-1"]),
    ("role notin (build)", ["lab-01", "pc-17", "rdfm-aa"]),  # no role: not in the set
    ("name=pc-1*", ["pc-1", "pc-17"]),
    ("name=pc-?", ["pc-1"]),
    ("!retired", ["pc-1", "pc-17", "rdfm-aa"]),
    ("retired", ["lab-01"]),
    ("os!=linux", ["lab-01", "pc-1"]),
    ('os="windows 11 pro"', ["lab-01"]),
    ("rdfm.hardware.devtype=imx8", ["rdfm-aa"]),
    (" room = 204 , !retired ", ["pc-1", "pc-17"]),
])
def test_the_documented_examples_select_what_they_say(text: str, names: list[str]) -> None:
    assert chosen(text) == names


def test_labels_win_over_facts_of_the_same_name() -> None:
    selector = parse("os=custom")
    assert selector.matches("x", {"os": "custom"}, {"os": "Linux"})
    assert not selector.matches("x", {}, {"os": "Linux"})


@pytest.mark.parametrize("text, where, why", [
    ("room=", "character 5", "a value is missing"),
    ("room=204 os=windows", "character 10", "expected a comma"),
    ("role in ()", "character 6", "needs one or more values"),
    ("a,,b", "character 3", "expected key=value"),
    ("", "empty", "empty"),
    ("x" * 3000, "longer than", "longer than"),
])
def test_a_malformed_selector_says_where_and_why(text: str, where: str, why: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(text)
    assert e.value.status == 400 and where in e.value.msg and why in e.value.msg


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_is_refused_with_400(text: str) -> None:
    try:
        selector = parse(text)
    except ApiError as e:
        assert e.status == 400 and e.msg.startswith("Invalid selector")
    else:
        assert selector.terms
        selector.matches("pc-1", {"room": "204"}, {"os": "Linux"})

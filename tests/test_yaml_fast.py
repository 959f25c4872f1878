"""The fast YAML path (`yaml_fast`, rapidyaml) never changes what a state file means: for any
text it either declines (None) or gives exactly the data ruamel's round-trip loader gives, and
it declines every text ruamel rejects, so every error is still worded by the exact path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler import load, yaml_fast
from reconciler.load import StateError, load_state, load_texts

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not yaml_fast.available(), reason="rapidyaml not installed")


def exact(text: str) -> Any:
    """ruamel's reading, as plain data, or the StateError it raises."""
    try:
        return load._plain(load._parse(text, "f.yaml"))
    except StateError as exc:
        return exc


def assert_same_or_declined(text: str) -> None:
    fast = yaml_fast.fast_load(text)
    if fast is None:
        return
    reference = exact(text)
    assert not isinstance(reference, StateError), (
        f"fast path accepted a text ruamel rejects: {text!r} -> {fast!r} ({reference})")
    assert fast == reference, f"{text!r}: fast {fast!r} != ruamel {reference!r}"
    assert _types(fast) == _types(reference), text


def _types(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _types(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_types(v) for v in node]
    return bool if isinstance(node, bool) else int if isinstance(node, int) else (
        float if isinstance(node, float) else str if isinstance(node, str) else type(node))


def test_the_projects_state_files_take_the_fast_path() -> None:
    for name in ("mailrec.yaml", "users.yaml"):
        text = (REPO / "state" / name).read_text()
        fast = yaml_fast.fast_load(text)
        assert fast is not None, name
        assert fast == exact(text)


@pytest.mark.parametrize("text", [
    "a: yes\nb: no\nc: on\nd: off\n",  # YAML 1.1 booleans: strings in 1.2, as ruamel reads
    "a: ~\n", "a: True\n", "a: TRUE\n", "a: Null\n", "a: 0x1f\n", "a: 010\n", "a: 0o10\n",
    "a: 1_000\n", "a: .inf\n", "a: -.inf\n", "a: .NaN\n", "a: 2001-12-14\n", "a: +1\n",
    "a: 1e3\n", "a: 1.5\n", "a: -7\n", "a: 0\n", "a: '010'\n", 'a: "true"\n', "a: ''\n",
    'a: ""\n', "a:\n", "a: null\n", "1: x\n", "true: x\n", "~: x\n", "'1': x\n",
    "a: &x 1\nb: *x\n", "a: !!str 1\n", "base: &b {c: 1}\nd:\n  <<: *b\n", "%YAML 1.1\n---\na: 1\n",
    "a: 1\n---\nb: 2\n", "---\na: 1\n", "a: 1\n...\n", "? [a]\n: 1\n", "a: 1\na: 2\n",
    "a: {b: 1, b: 2}\n", "a:\tb\n", "a: b\r\nc: d\r\n", "\ufeffa: 1\n", "a: \x07\n",
    "a: x\x85y\n", "a: b: c\n", "a: [1, 2\n", "a: 'x\n", "a:\n  - 1\n - 2\n", "- 1\n- 2\n",
    "just text\n", "a: |\n  line one\n  line two\n", "a: >\n  folded\n  text\n",
    "a: |-\n  # not a comment\n  x\n", 'a: "x\\ty\\u00e9"\n', "a: 'it''s'\n",
    "a: x # comment *&!\n", "# comment * & ! %\na: 1\n", "a: {b: [1, {c: d}]}\n",
    "a: x:y\n", "a: -x\n", "a: --1\n", "a: @x\n", "a: `x\n", "a: \"multi\n  # line\"\n",
    "a: [" * 70 + "]" * 70 + "\n", "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 70)),
    "users:\n  suga: {inbound: onprem, outbound: onprem}\n  'no': {inbound: rental}\n",
    "a: b\n c\n", "a:    \n  b\n", "a: 'x'y\n", "a: \"x\"y\n", "{a: 1}\n", "[a, b]\n",
    "a: {b}\n", "a: [b: c]\n", "a: {? b}\n", "a: 12:30\n", "a: 1:20:30\n", "a: =\n",
])
def test_tricky_texts_are_read_as_ruamel_reads_them_or_declined(text: str) -> None:
    assert_same_or_declined(text)


def test_declines_what_only_the_exact_path_can_word() -> None:
    for text in ("a: 1\na: 2\n", "a: &x 1\nb: *x\n", "a: b: c\n", "a:\tb\n", "1: x\n"):
        assert yaml_fast.fast_load(text) is None, text


def test_a_parse_error_leaves_no_trace_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    assert yaml_fast.fast_load("a: b: c\n") is None
    assert yaml_fast.fast_load("a: [1, 2\n") is None
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_declined_file_and_a_fast_file_merge_and_locate(tmp_path: Path) -> None:
    (tmp_path / "mailrec.yaml").write_text((REPO / "state" / "mailrec.yaml").read_text())
    users = "users:\n  suga: {inbound: onprem, outbound: onprem}\n  sato: &s {inbound: onprem}\n"
    (tmp_path / "users.yaml").write_text(users)  # an anchor: this file goes the exact way
    loaded = load_state(tmp_path)
    assert set(loaded.state.users) == {"suga", "sato"}
    assert loaded.locate("users.sato") == f"{tmp_path / 'users.yaml'}:3"
    assert loaded.locate("rental.spf", ) is not None


def test_fast_and_exact_paths_give_the_same_state() -> None:
    texts = [(name, (REPO / "state" / name).read_text()) for name in ("mailrec.yaml",
                                                                       "users.yaml")]
    fast = load._load_texts_fast(texts)
    assert fast is not None
    exact_state, exact_digest, _ = load._load_texts_exact(texts)
    assert fast[0] == exact_state and fast[1] == exact_digest


def test_an_invalid_state_is_worded_by_the_exact_path() -> None:
    main = (REPO / "state" / "mailrec.yaml").read_text()
    users = "users:\n  suga: {inbound: onprem, outbond: onprem}\n"
    assert yaml_fast.fast_load(users) is not None  # valid YAML, invalid state
    with pytest.raises(StateError) as raised:
        load_texts([("mailrec.yaml", main), ("users.yaml", users)])
    [problem] = raised.value.problems
    assert (problem.file, problem.line, problem.field) == ("users.yaml", 2, "users.suga.outbond")
    assert "did you mean 'outbound'" in problem.message


# Scalars where YAML parsers are known to differ, and plain words.
TRICKY = ["yes", "no", "on", "off", "y", "n", "true", "True", "false", "null", "Null", "~",
          "", "010", "0o10", "0x1f", "1_000", "1e3", "1.5", ".5", "5.", "-1", "+1", "0",
          ".inf", "-.inf", ".nan", "2001-12-14", "12:30", "1:20:30", "=", "<<", "-", "a:b",
          "a #b", "a# b", "a, b", "[a]", "{a}", "é", "日本", "suga", "suga.yamada",
          "user@example.co.jp", "smtp:[mx]:25", "203.0.113.0/24", "2001:db8::/32", "x y",
          "'", '"', "\\", "#", ":", "- x", "? x", "|", ">", "%", "@", "`", "a\nb", " a", "a "]


def render_scalar(value: str, style: int) -> str:
    if style == 0:
        return value  # plain, even where that is not valid YAML
    if style == 1:
        return "'" + value.replace("'", "''") + "'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# What state files mostly hold: half the scalars are drawn from here, so that many texts
# are ones the fast path accepts and the comparison with ruamel has something to compare.
COMMON = ["suga", "onprem", "rental", "drop", "inbound", "outbound", "mx", "1", "25", "300",
          "false", "file:/etc/tsig", "env:TOKEN", "203.0.113.7", "mail.example.co.jp",
          "v=spf1 -all", "hmac-sha256", "a_b", "x-y", "7d", "2h", "suga@example.co.jp"]

scalars = st.builds(render_scalar,
                    st.one_of(st.sampled_from(COMMON), st.sampled_from(TRICKY)),
                    st.integers(0, 2))


@st.composite
def documents(draw: st.DrawFn) -> str:
    """Texts shaped like state files (block mappings of flow mappings, lists, scalars),
    with any scalar plain or quoted, plus a random edit that may break them."""
    lines: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(scalars)
        shape = draw(st.integers(0, 3))
        if shape == 0:
            lines.append(f"{key}: {draw(scalars)}")
        elif shape == 1:
            items = draw(st.lists(st.tuples(scalars, scalars), max_size=3))
            lines.append(f"{key}: {{" + ", ".join(f"{k}: {v}" for k, v in items) + "}")
        elif shape == 2:
            lines.append(f"{key}:")
            lines.extend(f"  - {draw(scalars)}" for _ in range(draw(st.integers(1, 3))))
        else:
            lines.append(f"{key}:")
            for _ in range(draw(st.integers(1, 3))):
                lines.append(f"  {draw(scalars)}: {{inbound: {draw(scalars)}}}")
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from([" ", "  ", ":", "-", "'", '"', "[", "]", "{", "}", ",",
                                     "\n", "\n  ", "#", "\\"]))
        text = text[:at] + edit + text[at + draw(st.integers(0, 2)):]
    return text


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
@example("a: b\n  c: d\n")
@example("a: 'b'\n  c\n")
def test_generated_texts_are_read_as_ruamel_reads_them_or_declined(text: str) -> None:
    assert_same_or_declined(text)

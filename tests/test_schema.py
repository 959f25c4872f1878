"""`mailrec schema` describes what a state file may say (issue 10): the shipped state, merged
by top-level key as `load.py` merges a directory, validates against the printed JSON Schema;
so do the other forms the loader accepts (a connection string, `suga:` with no value, a
duration as 48h or seconds); and a state the loader refuses for its shape (an unknown key, a
wrong type, a missing section) is refused by the schema too."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from reconciler.model import DesiredState
from tests.conftest import REPO, run_cli
from tests.test_bad_input import BASE

Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = run_cli("schema")
    assert result.exit_code == 0, result.stderr
    printed: dict[str, Any] = json.loads(result.output)
    return printed


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # a valid schema of the draft it declares
    return cls(schema)


def merged_state(directory: Path) -> dict[str, Any]:
    """Every *.yaml of the directory, merged by top-level key (as load.py merges them)."""
    merged: dict[str, Any] = {}
    for path in sorted(directory.glob("*.yaml")):
        doc = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        assert isinstance(doc, dict), path
        assert not set(doc) & set(merged), f"{path}: a top-level key given twice"
        merged.update(doc)
    return merged


def errors(validator: jsonschema.protocols.Validator, state: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(state)]


def test_the_schema_declares_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema.validators.validator_for(schema) is jsonschema.Draft202012Validator


def test_the_shipped_state_validates(validator: jsonschema.protocols.Validator) -> None:
    state = merged_state(REPO / "state")
    assert {"version", "domain", "onprem", "rental", "dns", "router", "users"} <= set(state)
    DesiredState.model_validate(state)  # the loader's model accepts it ...
    assert errors(validator, state) == []  # ... and so does the schema


def test_the_state_a_lab_is_built_from_validates(
    validator: jsonschema.protocols.Validator, lab_state: Path
) -> None:
    assert errors(validator, merged_state(lab_state)) == []


def test_the_bad_input_tests_base_state_validates(
    validator: jsonschema.protocols.Validator,
) -> None:
    state = YAML(typ="safe").load(BASE)
    DesiredState.model_validate(state)
    assert errors(validator, state) == []


def _set(path: str, value: Any) -> Edit:
    """An edit that sets a dotted path (creating sections on the way)."""

    def edit(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


def _delete(key: str) -> Edit:
    def edit(state: dict[str, Any]) -> None:
        del state[key]

    return edit


@pytest.fixture
def base_state() -> Iterator[dict[str, Any]]:
    yield copy.deepcopy(merged_state(REPO / "state"))


# Forms the loader accepts beyond the shipped files' own: the schema must accept them too.
ACCEPTED: dict[str, Edit] = {
    "connect local": _set("onprem.connect", "local:/"),
    "connect without port": _set("onprem.connect", "ssh://root@mail.example.co.jp"),
    "user with no value": _set("users.suga", None),
    "user with defaults": _set("users.suga", {}),
    "alias of one member": _set("aliases.info", "suga"),
    "alias of members": _set("aliases.info", ["suga", "tanaka@example.net"]),
    "alias dropped": _set("aliases.info", "drop"),
    "duration in seconds": _set("policy.quiet_period", 3600),
    "duration in days": _set("policy.quiet_period", "2d"),
    "upstream relay": _set("onprem.upstream", [
        {"host": "relay.example.co.jp.", "connect": "ssh://root@relay.example.co.jp:22"}]),
    "no router": _delete("router"),
    "whitelist": _set("rental.whitelist", ["203.0.113.8/29", "2001:db8::/48"]),
    "uid range": _set("onprem.uid_range", [1000, 59999]),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_forms_the_loader_accepts_validate(
    validator: jsonschema.protocols.Validator, base_state: dict[str, Any], name: str
) -> None:
    ACCEPTED[name](base_state)
    DesiredState.model_validate(base_state)
    assert errors(validator, base_state) == []


# Shapes the loader refuses: the schema refuses them too (so this test can fail).
REJECTED: dict[str, Edit] = {
    "unknown top-level key": _set("colour", "blue"),
    "unknown key in a section": _set("onprem.hostname", "mail"),
    "misspelt user field": _set("users.suga", {"inbound": "rental", "outbund": "rental"}),
    "port as a word": _set("rental.relay_port", "twenty-five"),
    "port out of range": _set("rental.relay_port", 70000),
    "connect as a number": _set("onprem.connect", 22),
    "connect with another scheme": _set("onprem.connect", "telnet://mail.example.co.jp"),
    "side that is no side": _set("users.suga", {"inbound": "cloud"}),
    "duration without a unit": _set("policy.quiet_period", "two days"),
    "users as a list": _set("users", ["suga", "tanaka"]),
    "alias target a number": _set("aliases.info", 7),
    "version 2": _set("version", 2),
    "no domain": _delete("domain"),
    "no onprem": _delete("onprem"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_shapes_the_loader_refuses_are_refused(
    validator: jsonschema.protocols.Validator, base_state: dict[str, Any], name: str
) -> None:
    REJECTED[name](base_state)
    with pytest.raises(ValidationError):
        DesiredState.model_validate(base_state)
    assert errors(validator, base_state) != []


def _properties(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for model, definition in schema["$defs"].items():
        for field, prop in definition.get("properties", {}).items():
            yield f"{model}.{field}", prop
    yield from schema["properties"].items()


def test_every_default_is_written_as_a_state_file_would_write_it(
    schema: dict[str, Any],
) -> None:
    """A default shown in the schema (e.g. policy.quiet_period: 2d, not P2D) validates
    against its own field's schema: an editor that fills it in writes a valid state."""
    defaults = 0
    for name, prop in _properties(schema):
        if "default" not in prop:
            continue
        defaults += 1
        field = {k: v for k, v in prop.items() if k != "default"}
        field["$defs"] = schema["$defs"]
        found = list(jsonschema.Draft202012Validator(field).iter_errors(prop["default"]))
        assert found == [], f"{name}: default {prop['default']!r}: {found[0].message}"
    assert defaults > 10
    assert schema["$defs"]["Policy"]["properties"]["quiet_period"]["default"] == "2d"

"""The provider registry: names and `python.module:Class` paths, and its error messages."""

from __future__ import annotations

from typing import ClassVar

import pytest

from reconciler.drivers.rental import registry
from reconciler.drivers.rental.base import (
    Capability,
    ProviderContext,
    ProviderError,
    RentalProvider,
    RentalSnapshot,
)
from reconciler.drivers.rental.lab import LabProvider
from reconciler.drivers.rental.manual import ManualProvider
from reconciler.drivers.rental.registry import load_provider, provider_class

from .conftest import DOMAIN, rental_config


class EchoProvider(RentalProvider):
    """A working plug-in: a rental that has exactly the users it is asked about."""

    name: ClassVar[str] = "echo"
    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.LIST_MAILBOXES})

    def observe(self) -> RentalSnapshot:
        return RentalSnapshot(
            domain_accepted=True,
            mailboxes=dict.fromkeys(self.context.users, 0),
            whitelist=frozenset(),
        )


class Boastful(EchoProvider):
    """Claims to create mailboxes but does not implement it."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.CREATE_MAILBOX})


class Exploding(EchoProvider):
    def __init__(self, *args: object) -> None:
        raise ValueError("the API token is missing")


class NotAProvider:
    pass


def path_of(obj: type) -> str:
    # The test package's module name depends on how pytest imports it: derive it.
    return f"{obj.__module__}:{obj.__qualname__}"


def test_builtin_names() -> None:
    assert provider_class("manual") is ManualProvider
    assert provider_class("lab") is LabProvider


def test_unknown_name() -> None:
    message = r"unknown rental provider 'sakura': use lab, manual, ssh or python\.module:Class"
    with pytest.raises(ProviderError, match=message):
        provider_class("sakura")


def test_a_working_plugin_class_path() -> None:
    config = rental_config(path_of(EchoProvider))
    provider = load_provider(config, ProviderContext(DOMAIN, users=("suga",)))
    assert isinstance(provider, EchoProvider)
    assert provider.observe().mailboxes == {"suga": 0}


def test_a_module_that_does_not_exist() -> None:
    with pytest.raises(ProviderError) as caught:
        provider_class("mailrec_plugins.sakura:Provider")
    message = str(caught.value)
    assert "rental provider mailrec_plugins.sakura:Provider" in message
    assert "there is no module 'mailrec_plugins.sakura'" in message


def test_a_module_that_fails_to_import() -> None:
    module = f"{__package__}.plugin_broken"
    with pytest.raises(ProviderError) as caught:
        provider_class(f"{module}:Provider")
    message = str(caught.value)
    assert f"module '{module}' failed to import" in message
    assert "No module named 'mailrec_no_such_dependency'" in message  # the ImportError itself


def test_a_builtin_whose_module_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # How `ssh` reads before its module exists: named, with the module it looked for.
    monkeypatch.setitem(registry.BUILTIN, "ssh", "reconciler.drivers.rental.nossh:SshProvider")
    with pytest.raises(ProviderError, match=r"rental provider 'ssh': there is no module "
                                            r"'reconciler\.drivers\.rental\.nossh'"):
        provider_class("ssh")


def test_a_missing_class() -> None:
    with pytest.raises(ProviderError, match=r"has no class 'Nope'"):
        provider_class(f"{__name__}:Nope")


def test_a_class_that_is_not_a_provider() -> None:
    with pytest.raises(ProviderError, match=r"NotAProvider is not a RentalProvider subclass"):
        provider_class(path_of(NotAProvider))
    with pytest.raises(ProviderError, match=r"is not a RentalProvider subclass"):
        provider_class(f"{__name__}:DOMAIN")  # not even a class


def test_capabilities_are_checked_against_the_methods() -> None:
    with pytest.raises(ProviderError, match=r"claims capabilities .*: define create_mailbox"):
        provider_class(path_of(Boastful))


def test_a_constructor_that_fails_is_named() -> None:
    config = rental_config(path_of(Exploding))
    with pytest.raises(ProviderError, match=r"failed to start: ValueError: the API token"):
        load_provider(config, ProviderContext(DOMAIN))

"""Rental provider registry: turns `rental.provider` into a constructed `RentalProvider`.

Where it sits: called once per run by whoever builds the drivers for an observation or an
apply. A provider is named (`manual`, `lab`, `ssh`) or given as `python.module:Class`, the way
octoDNS loads its providers. Modules are imported only when asked for, so a provider whose
dependencies are missing (or not written yet) breaks only the configurations that use it.
Every failure is a `ProviderError` that says which provider, which module and why.
"""

from __future__ import annotations

import importlib
import re

from reconciler.drivers.rental.base import (
    Capability,
    ProviderContext,
    ProviderError,
    RentalProvider,
)
from reconciler.model import Rental

BUILTIN: dict[str, str] = {
    "manual": "reconciler.drivers.rental.manual:ManualProvider",
    "lab": "reconciler.drivers.rental.lab:LabProvider",
    "ssh": "reconciler.drivers.rental.ssh:SshProvider",
}
_CLASS_PATH_RE = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<cls>[A-Za-z_]\w*)$")

# A provider that claims one of these must implement the method: the executor calls it
# instead of asking a person, so a claim without the method would fail mid-apply.
_NEEDS_METHOD: dict[Capability, str] = {
    Capability.CREATE_MAILBOX: "create_mailbox",
    Capability.DELETE_MAILBOX: "delete_mailbox",
    Capability.WRITE_WHITELIST: "set_whitelist",
    Capability.CREATE_ALIAS: "create_alias",
}


def load_provider(config: Rental, context: ProviderContext) -> RentalProvider:
    """Construct the provider `config.provider` names; raises ProviderError with the reason."""
    cls = provider_class(config.provider)
    try:
        return cls(config, context)
    except ProviderError:
        raise
    except Exception as exc:
        # Bugs in a plug-in's constructor reach the user as "which provider failed and why";
        # the chained exception keeps the traceback for --debug.
        raise ProviderError(
            f"rental provider {config.provider!r} ({_qualname(cls)}) failed to start: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def provider_class(spec: str) -> type[RentalProvider]:
    """The class for a provider name or `python.module:Class`, checked but not constructed."""
    path = BUILTIN.get(spec, spec)
    match = _CLASS_PATH_RE.match(path)
    if match is None:
        raise ProviderError(
            f"unknown rental provider {spec!r}: use {', '.join(sorted(BUILTIN))} "
            "or python.module:Class"
        )
    module_name, class_name = match.group("module"), match.group("cls")
    label = f"rental provider {spec!r}" if spec in BUILTIN else f"rental provider {spec}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            reason = f"there is no module {module_name!r} ({exc})"
        else:
            reason = f"module {module_name!r} failed to import: {exc}"
        raise ProviderError(f"{label}: {reason}") from exc
    except Exception as exc:
        # A plug-in module that crashes on import (SyntaxError, a failed assert, ...).
        raise ProviderError(
            f"{label}: module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc

    cls = getattr(module, class_name, None)
    if cls is None:
        raise ProviderError(f"{label}: module {module_name!r} has no class {class_name!r}")
    if not isinstance(cls, type) or not issubclass(cls, RentalProvider):
        raise ProviderError(
            f"{label}: {module_name}.{class_name} is not a RentalProvider subclass "
            "(see reconciler.drivers.rental.base)"
        )
    check_provider_class(cls, label)
    return cls


def check_provider_class(cls: type[RentalProvider], label: str) -> None:
    """A provider declares `name` and `capabilities`, and implements what it claims."""
    where = f"{label}: {_qualname(cls)}"
    if not isinstance(getattr(cls, "name", None), str):
        raise ProviderError(f"{where} must set the class attribute name = '...'")
    capabilities = getattr(cls, "capabilities", None)
    if not isinstance(capabilities, frozenset) or not all(
        isinstance(c, Capability) for c in capabilities
    ):
        raise ProviderError(
            f"{where} must set the class attribute capabilities = frozenset({{Capability...}})"
        )
    missing = sorted(
        method
        for capability, method in _NEEDS_METHOD.items()
        if capability in capabilities and getattr(cls, method) is getattr(RentalProvider, method)
    )
    if missing:
        raise ProviderError(
            f"{where} claims capabilities it does not implement: define {', '.join(missing)}"
        )
    abstract = sorted(getattr(cls, "__abstractmethods__", ()))
    if abstract:
        raise ProviderError(f"{where} does not implement {', '.join(abstract)}")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"

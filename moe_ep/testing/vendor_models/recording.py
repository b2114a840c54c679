"""Check every vendor call an adapter makes against the real vendor signatures.

While :func:`recording` is active (inside :func:`~.install.installed`), every public method
of the models' classes, every model function and every name read from an installed vendor
module is recorded. Each call is bound (``inspect.Signature.bind``) against the **real**
signature recorded in ``tests/vendor_signatures/snapshot.json`` (taken from the vendor's
wheel or sources, see :mod:`.signatures`), not against the model's own: a call that would not
bind to the real API fails even if the model were lenient. A call of a vendor callable whose
real signature the snapshot lacks is reported as unverified, and every module attribute read
is reported so that the test can check it against the real module's exports.

Usage (in one rank)::

    with installed("deep_ep") as modules, recording(modules, snapshot) as log:
        ...  # run the adapter
    assert not log.failures and not log.unverified
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["CallLog", "real_signature", "recording"]

_MODELS = "moe_ep.testing.vendor_models"


@dataclass
class CallLog:
    """What the adapters did with the vendor API.

    Attributes:
        calls: ``(package, qualname)`` of every call that bound to its real signature.
        failures: calls that do not bind (``"package.qualname: TypeError message"``).
        unverified: ``package.qualname`` of called vendor callables without a recorded real
            signature.
        attributes: module name -> the public names read from it.
    """

    calls: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    attributes: dict[str, set[str]] = field(default_factory=dict)

    def called(self, package: str) -> set[str]:
        return {q for p, q in self.calls if p == package}


def real_signature(entries: list[list[Any]]) -> inspect.Signature:
    """An ``inspect.Signature`` from a snapshot entry ``[[name, kind, default], ...]``."""
    params = []
    for i, (name, kind, default) in enumerate(entries):
        kind = getattr(inspect.Parameter, kind)
        # Positional-only names are pybind's arg0...: anything positional binds.
        pname = f"_positional{i}" if kind is inspect.Parameter.POSITIONAL_ONLY else name
        params.append(inspect.Parameter(
            pname, kind,
            default=inspect.Parameter.empty if default is None else f"<default {default}>"))
    return inspect.Signature(params)


class _TracingModule(types.ModuleType):
    """A module that records the public names the adapters read from it (its ``__class__``
    while recording)."""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            state = types.ModuleType.__getattribute__(self, "__dict__")
            log, callers = state.get("_moe_ep_log"), state.get("_moe_ep_callers", "")
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if log is not None and caller.startswith(callers):
                log.attributes.setdefault(types.ModuleType.__getattribute__(self, "__name__"),
                                          set()).add(name)
        return types.ModuleType.__getattribute__(self, name)


def _wrap(fn: Callable, package: str, qualname: str, sigs: dict, log: CallLog,
          drop_self: bool, callers: str) -> Callable:
    entries = sigs.get(qualname)
    signature = real_signature(entries) if entries is not None else None

    @functools.wraps(fn)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        # Only the adapters' calls: the models call their own API internally too.
        if not sys._getframe(1).f_globals.get("__name__", "").startswith(callers):
            pass
        elif signature is None:
            log.unverified.append(f"{package}.{qualname}")
        else:
            try:
                signature.bind(*(args[1:] if drop_self else args), **kwargs)
            except TypeError as exc:
                log.failures.append(f"{package}.{qualname}: {exc}")
            else:
                log.calls.append((package, qualname))
        return fn(*args, **kwargs)

    return recorded


def _model_classes(modules: dict[str, types.ModuleType]) -> dict[type, str]:
    """Classes of the models reachable from the installed modules -> their package."""
    found: dict[type, str] = {}
    for name, mod in modules.items():
        package = name.split(".")[0]
        for value in vars(mod).values():
            if isinstance(value, type) and value.__module__.startswith(_MODELS):
                for cls in value.__mro__:
                    if cls.__module__.startswith(_MODELS):
                        found.setdefault(cls, package)
    return found


@contextmanager
def recording(modules: dict[str, types.ModuleType], snapshot: dict,
              callers: str = "moe_ep.managers") -> Iterator[CallLog]:
    """Record the vendor calls made through the installed model ``modules`` by code in the
    modules named ``callers*`` (the adapters; see the module docstring); everything is
    restored on exit."""
    log = CallLog()
    undo: list[Callable[[], None]] = []
    try:
        for cls, package in _model_classes(modules).items():
            sigs = snapshot["packages"][package]["signatures"]
            is_dataclass = dataclasses.is_dataclass(cls)
            for attr, raw in list(vars(cls).items()):
                if attr != "__init__" and attr.startswith("_"):
                    continue
                if isinstance(raw, (staticmethod, classmethod)):
                    fn, rewrap = raw.__func__, type(raw)
                elif inspect.isfunction(raw):
                    fn, rewrap = raw, None
                else:
                    continue
                ctor = attr == "__init__" and is_dataclass
                qualname = f"{cls.__name__}()" if ctor else f"{cls.__name__}.{attr}"
                wrapped = _wrap(fn, package, qualname, sigs, log, ctor, callers)
                setattr(cls, attr, rewrap(wrapped) if rewrap else wrapped)
                undo.append(functools.partial(setattr, cls, attr, raw))
        functions: dict[int, Callable] = {}
        for name, mod in modules.items():
            package = name.split(".")[0]
            sigs = snapshot["packages"][package]["signatures"]
            for attr, value in list(vars(mod).items()):
                if inspect.isfunction(value) and value.__module__.startswith(_MODELS):
                    wrapped = functions.setdefault(
                        id(value),
                        _wrap(value, package, value.__name__, sigs, log, False, callers))
                    setattr(mod, attr, wrapped)
                    undo.append(functools.partial(setattr, mod, attr, value))
            mod._moe_ep_log, mod._moe_ep_callers = log, callers
            mod.__class__ = _TracingModule
            undo.append(functools.partial(_untrace, mod))
        yield log
    finally:
        for step in reversed(undo):
            step()


def _untrace(mod: types.ModuleType) -> None:
    mod.__class__ = types.ModuleType
    del mod._moe_ep_log, mod._moe_ep_callers

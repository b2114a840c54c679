"""Per-shape handle cache for All2All managers.

A manager is built once per process group, but the buffers some backends need (DeepEP's
NVLink/RDMA buffers, pplx's ``AllToAll`` objects) depend on a layer's shape: hidden size,
maximum tokens per rank, dtype, number of experts. Two MoE layers with different hidden sizes
therefore need two handles. ``HandleCache`` keeps one handle per distinct set of keyword
arguments (the key is ``tuple(sorted(kwargs.items()))``, as vLLM does), creates it on the first
request and destroys every handle it holds in :meth:`HandleCache.clear`.

Unlike vLLM's ``WeakValueDictionary`` the cache holds strong references: the buffers are
expensive to re-create (DeepEP #571) and must be released at a point the caller chooses
(``destroy()``), not whenever the garbage collector runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

__all__ = ["HandleCache", "handle_key"]

HandleKey = tuple[tuple[str, Hashable], ...]


def handle_key(kwargs: Mapping[str, Any]) -> HandleKey:
    """Return the cache key of ``kwargs``: its items sorted by name.

    Raises:
        TypeError: a key is not a string, a value is not hashable (a list, a dict), or a value
            is a tensor (hashed by identity, so equal configurations would not share a handle);
            the message names the argument.
    """
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping of str to hashable values, got {type(kwargs)}")
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise TypeError(f"handle kwargs must be keyed by str, got key {name!r}")
        if isinstance(value, torch.Tensor):
            # Tensors hash by identity: two equal configurations would get two handles.
            raise TypeError(
                f"handle kwarg {name!r} is a tensor, which hashes by identity; pass its "
                "value as an int / tuple / torch.dtype instead"
            )
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"handle kwarg {name!r} has unhashable value of type {type(value).__name__}; "
                "pass hashable values (int, str, torch.dtype, tuple, a process group) so "
                "equal configurations share one handle"
            ) from None
    return tuple(sorted(kwargs.items()))


class HandleCache:
    """Thread-safe map from buffer kwargs to the handle built for them.

    ``get_or_create(kwargs, factory)`` returns the cached handle for ``kwargs`` or calls
    ``factory(**kwargs)`` once and caches its result. Creation happens under the lock, so
    concurrent callers asking for the same kwargs get one object and the factory (which may be
    a collective call in a backend) runs exactly once per key. The lock is re-entrant so a
    factory may itself use the cache.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._handles: dict[HandleKey, Any] = {}

    def get_or_create(self, kwargs: Mapping[str, Any], factory: Callable[..., Any]) -> Any:
        """Return the handle for ``kwargs``, creating it with ``factory(**kwargs)`` on a miss.

        Raises:
            TypeError: ``factory`` is not callable, or ``kwargs`` has unhashable values.
        """
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        key = handle_key(kwargs)
        with self._lock:
            try:
                return self._handles[key]
            except KeyError:
                pass
            handle = factory(**dict(key))
            self._handles[key] = handle
            return handle

    def __len__(self) -> int:
        with self._lock:
            return len(self._handles)

    def __contains__(self, kwargs: object) -> bool:
        if not isinstance(kwargs, Mapping):
            return False
        key = handle_key(kwargs)
        with self._lock:
            return key in self._handles

    def clear(self) -> None:
        """Destroy every cached handle (calling its ``destroy()`` if it has one) and forget it.

        Handles are destroyed in reverse creation order (later handles may depend on earlier
        ones). Every handle is attempted even if one ``destroy()`` raises; the first error is
        re-raised afterwards. The cache is empty and reusable afterwards.
        """
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        first_error: BaseException | None = None
        for handle in reversed(handles):
            destroy = getattr(handle, "destroy", None)
            if destroy is None:
                continue
            try:
                destroy()
            except Exception as exc:  # noqa: BLE001 - keep releasing; re-raised below
                if first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error

"""The device side of split learning over HTTP.

* `DeviceClient`: Keras-like `compile` / `fit` / `evaluate` / `predict` / `save` for the
  device segments of a split, with the server segment on a `splitkeras serve` server.
* `Transport`: the protocol client (`docs/protocol.md`): sessions, steps, retries.
* `NetworkConditions`: an emulated link (latency, bandwidth) for experiments.

Example:
    >>> from splitkeras.client import DeviceClient
    >>> client = DeviceClient("out", "http://127.0.0.1:8000")     # doctest: +SKIP
    >>> client.fit(x, y, epochs=2)                                 # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DeviceClient", "NetworkConditions", "Transport", "free_port", "wait_until_ready"]

if TYPE_CHECKING:
    from splitkeras.client.device import DeviceClient
    from splitkeras.client.local_server import free_port, wait_until_ready
    from splitkeras.client.network import NetworkConditions
    from splitkeras.client.transport import Transport

_MODULES = {"DeviceClient": "splitkeras.client.device",
            "NetworkConditions": "splitkeras.client.network",
            "Transport": "splitkeras.client.transport",
            "free_port": "splitkeras.client.local_server",
            "wait_until_ready": "splitkeras.client.local_server"}


def __getattr__(name: str) -> Any:
    """Import lazily: `Transport` and `NetworkConditions` do not load TensorFlow."""
    import importlib

    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'splitkeras.client' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

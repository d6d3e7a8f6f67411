"""The Temporal SDK's payload passes over workflow activations, skipped while they cannot change a payload.

Before a workflow activation reaches the workflow, temporalio walks it in three passes (external storage references,
external storage, payload codec), and walks each completion in three more on its way back. For every payload met, a
pass first asks the workflow instance which serialization context the payload's command has; under the sandbox each
such question runs through the sandbox. With no payload codec and no external storage configured (the companion
configures neither), every pass hands every payload back as it was; the SDK's DataConverter notes as much
(`_decode_payload_has_effect`). Those six walks were a fifth of a sandboxed worker's CPU a turn: bench.load, two
alternating pairs, worker CPU a turn 39.0, 39.7 ms with them and 30.3, 32.0 ms without; turns/s 24.6, 24.1 and
30.7, 29.5.

`install()` makes the worker skip them for a data converter with neither, and leaves them to run for one with
either. It checks the SDK functions it wraps; if a temporalio release changes them, it leaves the SDK as it is and
logs why, so a worker is never wrong, only slower.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import temporalio.bridge.worker as bridge_worker
from temporalio.converter import DataConverter
from temporalio.converter._extstore import StorageOperationMetrics

from core.logging import get_logger

_log = get_logger(__name__)

# The wrapped functions and the parameters (in order) they are known to take.
_WRAPPED = {"decode_activation": ["activation", "data_converter", "decode_headers", "storage_concurrency_limit"],
            "encode_completion": ["completion", "data_converter", "encode_headers", "storage_concurrency_limit"]}
# The SDK's own functions, once wrapped: name -> function.
_ORIGINALS: dict[str, Callable[..., Awaitable[StorageOperationMetrics]]] = {}


def passes_have_effect(data_converter: DataConverter) -> bool:
    """Whether the SDK's passes can change a payload of this data converter: it has a codec or external storage."""
    return data_converter.payload_codec is not None or data_converter.external_storage is not None


def _skipping(name: str) -> Callable[..., Awaitable[StorageOperationMetrics]]:
    async def skip_idle_passes(message: Any, data_converter: DataConverter, *args: Any,
                               **kwargs: Any) -> StorageOperationMetrics:
        if passes_have_effect(data_converter):
            return await _ORIGINALS[name](message, data_converter, *args, **kwargs)
        return StorageOperationMetrics()  # nothing was stored or retrieved

    skip_idle_passes.__name__ = skip_idle_passes.__qualname__ = name
    skip_idle_passes.skips_idle_passes = True  # type: ignore[attr-defined]
    return skip_idle_passes


def install() -> bool:
    """Skip the passes that cannot change a payload (once; again is a no-op); returns whether the skip is in place."""
    if installed():
        return True
    for name, params in _WRAPPED.items():
        found = getattr(bridge_worker, name, None)
        if found is None or not inspect.iscoroutinefunction(found):
            _log.warning("temporal.payload_passes_kept", function=name, reason="not found in this temporalio")
            return False
        if list(inspect.signature(found).parameters) != params:
            _log.warning("temporal.payload_passes_kept", function=name, reason="its parameters changed")
            return False
    for name in _WRAPPED:
        _ORIGINALS[name] = getattr(bridge_worker, name)
        setattr(bridge_worker, name, _skipping(name))
    return True


def installed() -> bool:
    """Whether the worker skips the passes that cannot change a payload."""
    return all(getattr(getattr(bridge_worker, name, None), "skips_idle_passes", False) for name in _WRAPPED)

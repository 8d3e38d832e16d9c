"""Errors of the inference engine; each says what went wrong and what to do."""
from __future__ import annotations

from autopar.core.errors import AutoparError, ConfigError


class SamplingParamsError(ConfigError):
    """A sampling parameter is out of range; raised when a request is made, before anything runs."""


class RequestError(AutoparError):
    """One request cannot be served (e.g. its prompt is longer than the model's context or the whole KV
    cache); only that request fails, the others go on."""


class CacheConfigError(ConfigError):
    """The KV cache cannot be sized as asked (budget too small for one block, unknown device memory)."""

"""Serving: a generation engine over one model bundle, testable without Ray.

The Ray Serve app (serve_apps/) wraps `Engine`; nothing here imports ray.
"""

from ft_ray.serve.engine import (
    Choice,
    Engine,
    EngineStats,
    GenerationResult,
    PlanCodes,
    StreamEvent,
    Usage,
)
from ft_ray.serve.requests import (
    MAX_N,
    EngineInfo,
    GenerationRequest,
    PlanSpec,
    RequestError,
    check_request,
    validate_request,
)

__all__ = [
    "MAX_N",
    "Choice",
    "Engine",
    "EngineInfo",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "PlanCodes",
    "PlanSpec",
    "RequestError",
    "StreamEvent",
    "Usage",
    "check_request",
    "validate_request",
]

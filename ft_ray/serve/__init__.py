"""Serving: a continuously batching generation engine over one model bundle, testable without
Ray, and the Ray Serve app that wraps it (`ft_ray.serve.app`, the only module here that imports
ray; import it explicitly).
"""

from ft_ray.serve.engine import (
    Choice,
    Engine,
    EngineStats,
    GenerationResult,
    PlanCodes,
    PromptScore,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from ft_ray.serve.handle import RequestHandle
from ft_ray.serve.requests import (
    MAX_N,
    EngineInfo,
    GenerationRequest,
    PlanSpec,
    RequestError,
    check_request,
    validate_request,
)
from ft_ray.serve.results import GenerationError, RequestCancelled
from ft_ray.serve.scheduler import SchedulerConfig

__all__ = [
    "MAX_N",
    "Choice",
    "Engine",
    "EngineInfo",
    "EngineStats",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "PlanCodes",
    "PlanSpec",
    "PromptScore",
    "RequestCancelled",
    "RequestError",
    "RequestHandle",
    "SchedulerConfig",
    "StreamEvent",
    "TokenLogprob",
    "Usage",
    "check_request",
    "validate_request",
]

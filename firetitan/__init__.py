"""firetitan: an async-first SDK for Firetitan/Tinker remote trainers.

Public names come only from this module; everything in underscored modules is private.
"""

from firetitan._errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BlockingCallInLoopError,
    ClientClosedError,
    ClientUsageError,
    ConflictError,
    FiretitanError,
    FutureTimeoutError,
    GoneError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    RequestTooLargeError,
    UnprocessableEntityError,
)
from firetitan._types import GradAccNormalization, SaveSamplerResult
from firetitan._version import __version__

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BlockingCallInLoopError",
    "ClientClosedError",
    "ClientUsageError",
    "ConflictError",
    "FiretitanError",
    "FutureTimeoutError",
    "GoneError",
    "GradAccNormalization",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RequestTooLargeError",
    "SaveSamplerResult",
    "UnprocessableEntityError",
    "__version__",
]

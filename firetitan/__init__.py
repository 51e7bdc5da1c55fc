"""firetitan: an async-first SDK for Firetitan/Tinker remote trainers.

Public names come only from this module; everything in underscored modules is private.
"""

from firetitan._async.futures import AsyncAPIFuture, FutureState
from firetitan._async.sampling import AsyncSamplingClient
from firetitan._async.service import AsyncFiretitanServiceClient
from firetitan._async.training import AsyncFiretitanTrainingClient
from firetitan._config import ClientConfig, Limits, RetryPolicy, Timeouts
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
from firetitan._futures import APIFuture
from firetitan._sync import FiretitanServiceClient, FiretitanTrainingClient, SamplingClient
from firetitan._types import GradAccNormalization, SaveSamplerResult
from firetitan._version import __version__
from firetitan.tokenizers import ByteTokenizer

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncAPIFuture",
    "AsyncFiretitanServiceClient",
    "AsyncFiretitanTrainingClient",
    "AsyncSamplingClient",
    "AuthenticationError",
    "BadRequestError",
    "BlockingCallInLoopError",
    "ByteTokenizer",
    "ClientClosedError",
    "ClientConfig",
    "ClientUsageError",
    "ConflictError",
    "FiretitanError",
    "FiretitanServiceClient",
    "FiretitanTrainingClient",
    "FutureState",
    "FutureTimeoutError",
    "GoneError",
    "GradAccNormalization",
    "InternalServerError",
    "Limits",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RequestTooLargeError",
    "RetryPolicy",
    "SamplingClient",
    "SaveSamplerResult",
    "Timeouts",
    "UnprocessableEntityError",
    "__version__",
]

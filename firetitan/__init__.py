"""firetitan: an async-first SDK for Firetitan/Tinker remote trainers.

Public names come only from this module; everything in underscored modules is private.
"""

from firetitan._async.async_future import AsyncAPIFuture, FutureState
from firetitan._async.deployment import AsyncDeployment
from firetitan._async.deployment_sampler import AsyncDeploymentSampler
from firetitan._async.rest import AsyncRestClient
from firetitan._async.sampling import AsyncSamplingClient
from firetitan._async.service import AsyncFiretitanServiceClient
from firetitan._async.training import AsyncFiretitanTrainingClient
from firetitan._async.weight_sync import AsyncWeightSyncer
from firetitan._blocking_future import APIFuture
from firetitan._config import ClientConfig, DeploymentConfig, Limits, RetryPolicy, Timeouts
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
    HotLoadError,
    HotLoadTimeoutError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    RequestTooLargeError,
    UnprocessableEntityError,
)
from firetitan._sync import (
    Deployment,
    DeploymentSampler,
    FiretitanServiceClient,
    FiretitanTrainingClient,
    RestClient,
    SamplingClient,
    WeightSyncer,
)
from firetitan._types import GradAccNormalization, SaveSamplerResult
from firetitan._version import __version__
from firetitan._wire import Completion, ReplicaStatus
from firetitan.tokenizers import ByteTokenizer

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncAPIFuture",
    "AsyncDeployment",
    "AsyncDeploymentSampler",
    "AsyncFiretitanServiceClient",
    "AsyncFiretitanTrainingClient",
    "AsyncRestClient",
    "AsyncSamplingClient",
    "AsyncWeightSyncer",
    "AuthenticationError",
    "BadRequestError",
    "BlockingCallInLoopError",
    "ByteTokenizer",
    "ClientClosedError",
    "ClientConfig",
    "ClientUsageError",
    "Completion",
    "ConflictError",
    "Deployment",
    "DeploymentConfig",
    "DeploymentSampler",
    "FiretitanError",
    "FiretitanServiceClient",
    "FiretitanTrainingClient",
    "FutureState",
    "FutureTimeoutError",
    "GoneError",
    "GradAccNormalization",
    "HotLoadError",
    "HotLoadTimeoutError",
    "InternalServerError",
    "Limits",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ReplicaStatus",
    "RequestFailedError",
    "RequestTooLargeError",
    "RestClient",
    "RetryPolicy",
    "SamplingClient",
    "SaveSamplerResult",
    "Timeouts",
    "UnprocessableEntityError",
    "WeightSyncer",
    "__version__",
]

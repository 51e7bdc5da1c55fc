"""The exception tree: everything firetitan raises on purpose derives from one root.

```
FiretitanError
├── APIError                          .message .body .request_id
│   ├── APIConnectionError            the request may or may not have reached the trainer
│   │   └── APITimeoutError           also a builtin TimeoutError
│   ├── APIStatusError                .status_code (one subclass per status below)
│   │   ├── BadRequestError 400 · AuthenticationError 401 · PermissionDeniedError 403
│   │   ├── NotFoundError 404 · ConflictError 409 · RequestTooLargeError 413
│   │   ├── UnprocessableEntityError 422 · RateLimitError 429
│   │   ├── GoneError 410 (an expired future)
│   │   └── InternalServerError 5xx
│   └── APIResponseValidationError    the trainer answered something we cannot read
├── RequestFailedError                a future failed on the trainer: .category user|server
├── FutureTimeoutError                a future passed its deadline (also a TimeoutError)
├── HotLoadError                      a deployment did not load a snapshot: .identity .replicas
│   └── HotLoadTimeoutError           ... within the time allowed (also a TimeoutError)
└── ClientUsageError (RuntimeError)
    ├── ClientClosedError             the client was closed
    └── BlockingCallInLoopError       a blocking facade call on the facade's own loop
```

Foreign exceptions (aiohttp, tenacity, orjson) are translated at one boundary,
`firetitan._transport`, and chained with ``raise ... from``. No message or attribute
here ever carries the API key: the transport never puts headers into errors.
"""

from __future__ import annotations

from typing import Any, Literal

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
    "HotLoadError",
    "HotLoadTimeoutError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "status_error_class",
]


class FiretitanError(Exception):
    """Root of every exception that firetitan raises on purpose."""


class APIError(FiretitanError):
    """A request to the trainer did not give a usable answer.

    Attributes:
        message: What went wrong, in words.
        body: The decoded JSON body of the trainer's answer, when there was one.
        request_id: The trainer's request id, when known.
    """

    def __init__(self, message: str, *, body: Any = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors do not survive the default exception pickling.
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls: type[BaseException], state: dict[str, Any], args: tuple[Any, ...]) -> Any:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class APIConnectionError(APIError):
    """The trainer could not be reached, or the connection broke mid-request."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A request timed out (also catchable as the builtin `TimeoutError`)."""


class APIResponseValidationError(APIError):
    """The trainer answered with a body that does not match the protocol."""


class APIStatusError(APIError):
    """The trainer answered with a 4xx or 5xx status.

    Attributes:
        status_code: The HTTP status.
    """

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, body=body, request_id=request_id)
        self.status_code = status_code


class BadRequestError(APIStatusError):
    """400: the trainer refused the request body."""

    status_code: Literal[400]


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""

    status_code: Literal[401]


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""

    status_code: Literal[403]


class NotFoundError(APIStatusError):
    """404: the model, future or checkpoint does not exist."""

    status_code: Literal[404]


class ConflictError(APIStatusError):
    """409: a transient conflict on the trainer."""

    status_code: Literal[409]


class GoneError(APIStatusError):
    """410: the future expired on the trainer before its result was read."""

    status_code: Literal[410]


class RequestTooLargeError(APIStatusError):
    """413: the request body is larger than the trainer accepts."""

    status_code: Literal[413]


class UnprocessableEntityError(APIStatusError):
    """422: the request is well-formed but its values are not acceptable."""

    status_code: Literal[422]


class RateLimitError(APIStatusError):
    """429: the trainer asks us to slow down."""

    status_code: Literal[429]


class InternalServerError(APIStatusError):
    """5xx: the trainer failed."""


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status: int) -> type[APIStatusError]:
    """Return the exception class for an HTTP error status.

    Args:
        status: An HTTP status of 400 or more.

    Returns:
        The most specific `APIStatusError` subclass for it.
    """
    if status >= 500:
        return InternalServerError
    return _STATUS_CLASSES.get(status, APIStatusError)


class RequestFailedError(FiretitanError):
    """A request was accepted but failed while the trainer executed it.

    Attributes:
        message: The trainer's explanation.
        request_id: The trainer's id of the failed request.
        category: ``"user"`` for a mistake in the request (bad shapes, unknown loss),
            ``"server"`` for a fault on the trainer, ``"unknown"`` otherwise.
        error_class: The trainer's short classification, when it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        category: str = "unknown",
        error_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category if category in ("user", "server") else "unknown"
        self.error_class = error_class

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


class FutureTimeoutError(FiretitanError, TimeoutError):
    """A future did not resolve before its deadline."""


class HotLoadError(FiretitanError):
    """A deployment did not come to serve a snapshot (or was not asked to, because it
    could not have: a delta whose base it does not hold).

    Attributes:
        message: What happened, with what every replica reported.
        identity: The snapshot that was to be served.
        replicas: The last status of each replica, as the deployment reported it.
    """

    def __init__(self, message: str, *, identity: str, replicas: Any = ()) -> None:
        super().__init__(message)
        self.message = message
        self.identity = identity
        self.replicas = list(replicas)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


class HotLoadTimeoutError(HotLoadError, TimeoutError):
    """The deployment was still not serving the snapshot when the time allowed ran out."""


class ClientUsageError(FiretitanError, RuntimeError):
    """The client was used in a way that cannot work."""


class ClientClosedError(ClientUsageError):
    """The client, or the service client that owns it, was closed."""


class BlockingCallInLoopError(ClientUsageError):
    """A blocking facade method was called on the facade's own event-loop thread."""

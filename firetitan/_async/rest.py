"""`AsyncRestClient`: a trainer's training runs, checkpoints and sessions, as tinker's
``RestClient`` sees them.

The REST endpoints need no session: the client holds only a connection pool, opened on
first use and closed by `aclose` (or an ``async with`` block). Answers are tinker's own
types. Checkpoints are named by their ``tinker://<run>/<weights|sampler_weights|
external_weights>/<name>`` path, as every tinker checkpoint listing gives it.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, TypeVar

from tinker import types as ttypes

from firetitan._async._checks import non_empty_str, positive_int
from firetitan._config import ClientConfig, resolve_api_key, resolve_base_url
from firetitan._errors import ClientClosedError
from firetitan._transport import Transport
from firetitan._unpicklable import Unpicklable
from firetitan._wire import endpoints

__all__ = ["AsyncRestClient"]

R = TypeVar("R")


class AsyncRestClient(Unpicklable):
    """Training runs, checkpoints and sessions of a trainer (tinker's REST API).

    Args:
        base_url: The trainer's URL; None reads ``FIRETITAN_BASE_URL``.
        api_key: The API key; None reads ``FIRETITAN_API_KEY``.
        config: Timeouts and retries.
    """

    _unpicklable = "a REST client holds connections and cannot be pickled"

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        config: ClientConfig | None = None,
    ) -> None:
        self._transport = Transport(
            resolve_base_url(base_url), resolve_api_key(api_key), config or ClientConfig()
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncRestClient(base_url={self._transport.base_url!r})"

    async def __aenter__(self) -> AsyncRestClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            await self._transport.aclose()

    # ------------------------------------------------------------------ runs

    async def list_training_runs(
        self, limit: int = 20, offset: int = 0
    ) -> ttypes.TrainingRunsResponse:
        """List the trainer's training runs, a page at a time.

        Raises:
            ValueError: ``limit`` below 1 or ``offset`` below 0.
            APIStatusError: The trainer refused the request.
        """
        return await self._paged(endpoints.LIST_TRAINING_RUNS, limit, offset)

    async def get_training_run(self, training_run_id: str) -> ttypes.TrainingRun:
        """Describe one training run (base model, LoRA rank, last checkpoints, metadata).

        Raises:
            NotFoundError: No such run.
        """
        run = _segment(training_run_id, "training_run_id")
        return await self._call(endpoints.GET_TRAINING_RUN, run_id=run)

    async def get_training_run_by_tinker_path(self, tinker_path: str) -> ttypes.TrainingRun:
        """The training run that owns a checkpoint.

        Raises:
            ValueError: Not a ``tinker://`` checkpoint path.
            NotFoundError: No such run.
        """
        return await self.get_training_run(_parse(tinker_path).training_run_id)

    # ------------------------------------------------------------------ checkpoints

    async def list_checkpoints(self, training_run_id: str) -> ttypes.CheckpointsListResponse:
        """Every checkpoint of a training run (training, sampler and external).

        Raises:
            NotFoundError: No such run.
        """
        run = _segment(training_run_id, "training_run_id")
        return await self._call(endpoints.LIST_RUN_CHECKPOINTS, run_id=run)

    async def list_user_checkpoints(
        self, limit: int = 100, offset: int = 0
    ) -> ttypes.CheckpointsListResponse:
        """Every checkpoint the API key can see, a page at a time.

        Raises:
            ValueError: ``limit`` below 1 or ``offset`` below 0.
        """
        return await self._paged(endpoints.LIST_USER_CHECKPOINTS, limit, offset)

    async def delete_checkpoint(self, tinker_path: str) -> None:
        """Delete a checkpoint.

        Raises:
            ValueError: Not a ``tinker://`` checkpoint path.
            NotFoundError: No such checkpoint.
        """
        await self._on_checkpoint(endpoints.DELETE_CHECKPOINT, tinker_path)

    async def set_checkpoint_ttl(self, tinker_path: str, ttl_seconds: int | None) -> None:
        """Make a checkpoint expire ``ttl_seconds`` from now; None keeps it for good.

        Raises:
            ValueError: Not a ``tinker://`` checkpoint path, or a TTL below 1.
            NotFoundError: No such checkpoint.
        """
        if ttl_seconds is not None:
            positive_int(ttl_seconds, "ttl_seconds")
        await self._on_checkpoint(
            endpoints.SET_CHECKPOINT_TTL, tinker_path, {"ttl_seconds": ttl_seconds}
        )

    async def publish_checkpoint(self, tinker_path: str) -> None:
        """Mark a checkpoint public.

        Raises:
            ValueError: Not a ``tinker://`` checkpoint path.
            NotFoundError: No such checkpoint.
        """
        await self._on_checkpoint(endpoints.PUBLISH_CHECKPOINT, tinker_path, {})

    async def unpublish_checkpoint(self, tinker_path: str) -> None:
        """Mark a checkpoint private again.

        Raises:
            ValueError: Not a ``tinker://`` checkpoint path.
            NotFoundError: No such checkpoint.
        """
        await self._on_checkpoint(endpoints.UNPUBLISH_CHECKPOINT, tinker_path)

    async def get_weights_info_by_tinker_path(self, tinker_path: str) -> ttypes.WeightsInfoResponse:
        """The base model and LoRA options a ``weights`` or ``sampler_weights``
        checkpoint was saved with.

        Raises:
            ValueError: ``tinker_path`` is empty.
            NotFoundError: No such checkpoint.
        """
        path = non_empty_str(tinker_path, "tinker_path")
        return await self._call(endpoints.WEIGHTS_INFO, {"tinker_path": path})

    async def copy_weights(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        ttl_seconds: int | None = None,
    ) -> str:
        """Copy a ``weights`` or ``sampler_weights`` checkpoint into a new training run
        that cannot be trained on; the copy shares the source's storage and outlives its
        deletion. A retried request never makes a second copy.

        Args:
            path: The checkpoint's ``tinker://`` path.
            destination_project_id: The project that owns the copy; None reads
                ``TINKER_PROJECT_ID``.
            ttl_seconds: Seconds until the copy expires, 3600 (an hour) to ten years;
                None keeps it.

        Returns:
            The copy's ``tinker://`` path.

        Raises:
            ValueError: ``path`` is empty, or no destination project.
            BadRequestError: A TTL out of range, or a delta sampler export.
            NotFoundError: No such checkpoint.
        """
        source = non_empty_str(path, "path")
        project = destination_project_id or os.environ.get("TINKER_PROJECT_ID") or None
        if project is None:
            raise ValueError("give destination_project_id or set TINKER_PROJECT_ID")
        body: dict[str, Any] = {"source_path": source, "destination_project_id": project}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        copied = await self._call(endpoints.COPY_WEIGHTS, body)
        return copied.tinker_path

    # ------------------------------------------------------------------ sessions

    async def list_sessions(self, limit: int = 20, offset: int = 0) -> ttypes.ListSessionsResponse:
        """The ids of the trainer's live sessions, a page at a time.

        Raises:
            ValueError: ``limit`` below 1 or ``offset`` below 0.
        """
        return await self._paged(endpoints.LIST_SESSIONS, limit, offset)

    async def get_session(self, session_id: str) -> ttypes.GetSessionResponse:
        """A session's models (training run ids) and sampling sessions.

        Raises:
            NotFoundError: No such live session.
        """
        session = _segment(session_id, "session_id")
        return await self._call(endpoints.GET_SESSION, session_id=session)

    # ------------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the REST client was closed")

    async def _call(
        self, endpoint: endpoints.Endpoint[R], body: Any = None, query: str = "", **params: str
    ) -> R:
        """Call ``endpoint`` with its path parameters (already quoted) and query."""
        self._check_open()
        path = endpoint.path.format(**params) + (f"?{query}" if query else "")
        return await self._transport.call(endpoint, body, path=path)

    async def _paged(self, endpoint: endpoints.Endpoint[R], limit: int, offset: int) -> R:
        positive_int(limit, "limit")
        positive_int(offset, "offset", zero=True)
        query = urllib.parse.urlencode({"limit": limit, "offset": offset})
        return await self._call(endpoint, query=query)

    async def _on_checkpoint(
        self, endpoint: endpoints.Endpoint[Any], tinker_path: str, body: Any = None
    ) -> None:
        parsed = _parse(tinker_path)
        segment, name = parsed.checkpoint_id.split("/", 1)
        await self._call(
            endpoint,
            body,
            run_id=urllib.parse.quote(parsed.training_run_id, safe=""),
            segment=segment,
            name=urllib.parse.quote(name, safe=""),
        )


def _segment(value: str, what: str) -> str:
    return urllib.parse.quote(non_empty_str(value, what), safe="")


def _parse(tinker_path: str) -> ttypes.ParsedCheckpointTinkerPath:
    return ttypes.ParsedCheckpointTinkerPath.from_tinker_path(
        non_empty_str(tinker_path, "tinker_path")
    )

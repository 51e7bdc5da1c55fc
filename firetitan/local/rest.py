"""tinker's REST view of a trainer: training runs, their checkpoints, sessions and the
download of external weights.

What tinker 0.38's ``RestClient`` (and tinker-cookbook's ``checkpoint_utils`` and
``weights.download``) call, answered in tinker's own JSON shapes:

* ``GET training_runs`` and ``GET training_runs/{id}``: this trainer is one training
  run, whose id is the job id (the first segment of every ``tinker://`` path it hands
  out, which is what tinker reads back as the run id); a model id of the job names the
  same run. Its base model, LoRA rank and ``user_metadata`` are those of the model that
  wrote the newest training checkpoint (the lineage a resume continues), else of the
  latest model created.
* ``GET training_runs/{id}/checkpoints`` and ``GET checkpoints``: every valid checkpoint
  of the job, ``training`` (``weights/<name>``), ``sampler`` (``sampler_weights/<name>``)
  and ``external`` (``external_weights/<name>``).
* ``DELETE training_runs/{id}/checkpoints/{segment}/{name}``, ``PUT .../ttl``
  (``{"ttl_seconds": n | null}``, counted from now) and ``POST``/``DELETE .../publish``.
* ``GET training_runs/{id}/checkpoints/external_weights/{name}/external_weights_urls``:
  one URL per file of an external export, signed with a secret of this server process
  and valid for `URL_LIFETIME_SECONDS`. ``GET external_files/{name}/{file}`` serves
  them; the signature stands in for the API key there (the cookbook fetches them with
  plain ``urllib``), so that route alone is open without ``X-API-Key``.
* ``GET sessions`` and ``GET sessions/{id}``: live sessions, their models and sampling
  sessions.
* ``POST weights_info`` (``{"tinker_path"}``): the base model and LoRA options a
  ``weights`` or ``sampler_weights`` checkpoint was saved with. ``POST copy_weights``:
  the checkpoint copied, under its name, into a new training run ``copy-<hex>`` that no
  trainer trains (its files hard-linked, so no bytes are duplicated), answered with the
  copy's ``tinker://`` path; the ``X-Idempotency-Key`` of a retry answers the copy
  already made. Both read a checkpoint wherever ``load_weights`` could (this job's, or
  another job's under the same root), never one outside the root; a delta sampler export
  is not copied (it needs the export it applies to). The copy's run is reached only by
  its ``tinker://`` paths: the endpoints above answer for this job's run alone, so they
  never change another job's checkpoints.

Paths are under ``/api/v1``; the routes are rows of `firetitan._wire.endpoints`.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from firetitan._checkpoint_paths import validate_name
from firetitan._wire import endpoints
from firetitan.local.checkpoints import KINDS, CheckpointStore, Kind, Manifest
from firetitan.local.sessions import Registry
from firetitan.local.tinker import compat as tinker_compat

__all__ = ["URL_LIFETIME_SECONDS", "RestApi", "RestError", "is_download"]

#: How long a signed download URL stays valid.
URL_LIFETIME_SECONDS: Final = 3600
# copy_weights: the TTL range tinker documents (an hour to ten years), and how many
# idempotency keys are remembered.
_MIN_TTL: Final = 3600
_MAX_TTL: Final = 10 * 365 * 24 * 3600
_REMEMBERED_COPIES: Final = 1024
# Signed download URLs: the one route served without ``X-API-Key``.
_DOWNLOAD_PREFIX: Final = endpoints.EXTERNAL_FILE.path.split("{", 1)[0]
_CHECKPOINT_TYPE: Final[dict[Kind, str]] = {
    "state": "training",
    "sampler": "sampler",
    "external": "external",
}


def is_download(request: web.Request) -> bool:
    """Whether a request is for a signed download URL (checked by its signature, not
    the API key)."""
    return request.path.startswith(_DOWNLOAD_PREFIX) and "signature" in request.query


class RestError(Exception):
    """A REST request that cannot be answered: the HTTP status and what was wrong."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


JSONHandler = Callable[[web.Request], Any]


class RestApi:
    """The REST handlers of one trainer.

    Args:
        store: The job's checkpoint store.
        registry: The server's sessions and models.
        json_response: Turns a JSON-able object into the server's response.
        read_body: Reads a request's body under the server's size limit.
    """

    def __init__(
        self,
        store: CheckpointStore,
        registry: Registry,
        json_response: Callable[[Any], web.Response],
        read_body: Callable[[web.Request], Awaitable[bytes]],
    ) -> None:
        self._store = store
        self._registry = registry
        self._json = json_response
        self._read = read_body
        # Signs download URLs; a restart invalidates the URLs it handed out.
        self._secret = secrets.token_bytes(32)
        # copy_weights answers by idempotency key (oldest forgotten first), so that a
        # retried request never makes a second copy; the lock keeps two at once apart.
        self._copies: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._copy_lock = asyncio.Lock()

    def handlers(self) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        """The handlers of the REST rows of `firetitan._wire.endpoints`, by name."""
        return {
            "list_training_runs": self._list_runs,
            "get_training_run": self._get_run,
            "list_run_checkpoints": self._run_checkpoints,
            "delete_checkpoint": self._delete_checkpoint,
            "set_checkpoint_ttl": self._set_ttl,
            "publish_checkpoint": self._publish,
            "unpublish_checkpoint": self._unpublish,
            "external_weights_urls": self._urls,
            "list_user_checkpoints": self._user_checkpoints,
            "list_sessions": self._list_sessions,
            "get_session": self._get_session,
            "external_file": self._download,
            "weights_info": self._weights_info,
            "copy_weights": self._copy_weights,
        }

    # ------------------------------------------------------------------ runs

    def _run_id(self, request: web.Request) -> str:
        """The run a path names: the job id, or a model id of this job."""
        run_id = request.match_info["run_id"]
        if run_id != self._store.job_id and run_id not in self._registry.models:
            raise RestError(404, f"training run {run_id!r} is not this trainer's")
        return run_id

    async def _list_runs(self, request: web.Request) -> web.Response:
        runs = [await asyncio.to_thread(self._run)]
        limit, offset = _page(request, 20)
        return self._json(
            {
                "training_runs": runs[offset : offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
            }
        )

    async def _get_run(self, request: web.Request) -> web.Response:
        self._run_id(request)
        return self._json(await asyncio.to_thread(self._run))

    def _run(self) -> dict[str, Any]:
        """The job as one tinker ``TrainingRun`` (off the loop: reads manifests)."""
        states = self._store.manifests("state")
        samplers = self._store.manifests("sampler")
        latest = self._registry.latest_model
        newest = max(states, key=lambda m: m.created_at, default=None)
        spec: dict[str, Any]
        if newest is not None or latest is None:
            spec = newest.metadata.get("model_spec", {}) if newest else {}
            user_metadata = newest.metadata.get("user_metadata") if newest else None
        else:
            spec = {"base_model": latest.spec.base_model, "lora_rank": latest.spec.lora_rank}
            user_metadata = latest.user_metadata
        times = [m.created_at for m in states + samplers]
        if latest is not None:
            times.append(latest.last_request_time)
        last_time = max(times, default=time.time())
        rank = int(spec.get("lora_rank") or 0)
        return {
            "training_run_id": self._store.job_id,
            "base_model": str(spec.get("base_model", "")),
            "model_owner": "local",
            "is_lora": rank > 0,
            "lora_rank": rank or None,
            "last_request_time": _iso(last_time),
            "last_checkpoint": self._checkpoint(states[-1]) if states else None,
            "last_sampler_checkpoint": self._checkpoint(samplers[-1]) if samplers else None,
            "user_metadata": user_metadata,
        }

    # ------------------------------------------------------------------ checkpoints

    async def _run_checkpoints(self, request: web.Request) -> web.Response:
        self._run_id(request)
        return self._json({"checkpoints": await asyncio.to_thread(self._checkpoints)})

    async def _user_checkpoints(self, request: web.Request) -> web.Response:
        found = await asyncio.to_thread(self._checkpoints)
        limit, offset = _page(request, 100)
        return self._json(
            {
                "checkpoints": found[offset : offset + limit],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(found)},
            }
        )

    def _checkpoints(self) -> list[dict[str, Any]]:
        found = [self._checkpoint(m) for kind in KINDS for m in self._store.manifests(kind)]
        return sorted(found, key=lambda c: c["time"])

    def _checkpoint(self, manifest: Manifest) -> dict[str, Any]:
        kind: Kind = manifest.kind  # type: ignore[assignment]
        path = tinker_compat.tinker_path(self._store.job_id, kind, manifest.name)
        try:
            size = sum(p.stat().st_size for p in self._store.files(kind, manifest.name).values())
        except (FileNotFoundError, OSError):
            size = None  # deleted or expired while listing
        return {
            "checkpoint_id": path.split("/", 3)[3],
            "checkpoint_type": _CHECKPOINT_TYPE[kind],
            "time": _iso(manifest.created_at),
            "tinker_path": path,
            "size_bytes": size,
            "public": bool(manifest.metadata.get("public", False)),
            "user_metadata": manifest.metadata.get("checkpoint_user_metadata"),
            "expires_at": None if manifest.expires_at is None else _iso(manifest.expires_at),
        }

    def _named(self, request: web.Request) -> tuple[Kind, str]:
        """The checkpoint a ``.../checkpoints/{segment}/{name}`` path names."""
        self._run_id(request)
        segment, name = request.match_info["segment"], request.match_info["name"]
        try:
            path = f"{tinker_compat.TINKER_SCHEME}{self._store.job_id}/{segment}/{name}"
            parsed = tinker_compat.parse_tinker_path(path)
        except ValueError as exc:
            raise RestError(404, f"checkpoint {segment}/{name}: {exc}") from None
        return parsed.kind, parsed.name

    async def _changed(self, fn: Callable[[], object]) -> web.Response:
        try:
            await asyncio.to_thread(fn)
        except FileNotFoundError as exc:
            raise RestError(404, str(exc)) from None
        return self._json({})

    async def _delete_checkpoint(self, request: web.Request) -> web.Response:
        kind, name = self._named(request)
        return await self._changed(lambda: self._store.delete(kind, name))

    async def _set_ttl(self, request: web.Request) -> web.Response:
        kind, name = self._named(request)
        body = _json_object(await self._read(request))
        ttl = body.get("ttl_seconds")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
            raise RestError(400, f"ttl_seconds must be a positive integer or null, got {ttl!r}")
        expires = None if ttl is None else time.time() + ttl
        return await self._changed(lambda: self._store.update(kind, name, expires_at=expires))

    async def _publish(self, request: web.Request) -> web.Response:
        await self._read(request)  # no body expected; read under the size limit
        return await self._set_public(request, True)

    async def _unpublish(self, request: web.Request) -> web.Response:
        return await self._set_public(request, False)

    async def _set_public(self, request: web.Request, public: bool) -> web.Response:
        kind, name = self._named(request)

        def change() -> None:
            _directory, manifest = self._store.resolve(kind, name)
            self._store.update(kind, name, metadata={**manifest.metadata, "public": public})

        return await self._changed(change)

    # ------------------------------------------------------------------ weights info, copies

    def _source(self, value: object, field: str) -> tuple[Kind, str]:
        """The checkpoint a ``tinker://`` path names, as (kind, store path)."""
        if not isinstance(value, str):
            raise RestError(400, f"{field} must be a tinker:// path string, got {value!r}")
        try:
            parsed = tinker_compat.parse_tinker_path(value)
        except ValueError as exc:
            raise RestError(400, f"{field}: {exc}") from None
        return parsed.kind, str(parsed.checkpoint_ref(self._store.job_id))

    def _resolved(self, kind: Kind, path: str, field: str) -> Manifest:
        try:
            return self._store.resolve(kind, path)[1]
        except (ValueError, FileNotFoundError) as exc:
            raise RestError(404, f"{field}: {exc}") from None

    async def _weights_info(self, request: web.Request) -> web.Response:
        body = _json_object(await self._read(request))
        kind, path = self._source(body.get("tinker_path"), "tinker_path")
        manifest = await asyncio.to_thread(self._resolved, kind, path, "tinker_path")
        spec = manifest.metadata.get("model_spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("base_model"), str):
            raise RestError(404, f"tinker_path: checkpoint {manifest.name!r} records no model")
        rank = int(spec.get("lora_rank") or 0)
        lora = rank > 0
        return self._json(
            {
                "base_model": spec["base_model"],
                "is_lora": lora,
                "lora_rank": rank if lora else None,
                "train_unembed": bool(spec.get("train_unembed", True)) if lora else None,
                "train_mlp": bool(spec.get("train_mlp", True)) if lora else None,
                "train_attn": bool(spec.get("train_attn", True)) if lora else None,
            }
        )

    async def _copy_weights(self, request: web.Request) -> web.Response:
        body = _json_object(await self._read(request))
        if request.headers.get("X-Tinker-Weights-Access-Token") is not None:
            raise RestError(400, "weights_access_token is not supported by this trainer")
        kind, path = self._source(body.get("source_path"), "source_path")
        project = self._destination(body)
        ttl = body.get("ttl_seconds")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int) or not _MIN_TTL <= ttl <= _MAX_TTL
        ):
            raise RestError(
                400, f"ttl_seconds must be an integer in [{_MIN_TTL}, {_MAX_TTL}], got {ttl!r}"
            )
        key = request.headers.get("X-Idempotency-Key")
        async with self._copy_lock:
            copied = self._copies.get(key) if key else None
            if copied is None:
                copied = await asyncio.to_thread(self._copy, kind, path, project, ttl)
                if key:
                    self._copies[key] = copied
                    while len(self._copies) > _REMEMBERED_COPIES:
                        self._copies.popitem(last=False)
        return self._json({"tinker_path": copied})

    def _destination(self, body: dict[str, Any]) -> str | None:
        """The project that owns the copy (recorded, not enforced: a local trainer has
        none), checked for tinker's two forms."""
        project, session_id = body.get("destination_project_id"), body.get("session_id")
        if session_id is not None:
            if session_id not in self._registry.sessions:
                raise RestError(404, f"session_id: unknown session {session_id!r}")
            seq = body.get("model_seq_id")
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise RestError(400, f"model_seq_id must be an integer >= 0, got {seq!r}")
            return None
        if not isinstance(project, str) or not project:
            raise RestError(400, "give destination_project_id, or session_id and model_seq_id")
        return project

    def _copy(self, kind: Kind, path: str, project: str | None, ttl: int | None) -> str:
        """Copy into a new run (off the loop: links files); the copy's tinker path."""
        source = self._resolved(kind, path, "source_path")
        if kind == "sampler" and source.metadata.get("delta_of"):
            raise RestError(
                400,
                f"source_path: {source.name!r} is a delta on sampler export "
                f"{source.metadata['delta_of']!r}; copy a full export",
            )
        run_id = f"copy-{secrets.token_hex(6)}"
        origin = tinker_compat.tinker_path(source.job_id, kind, source.name)
        extra = {"copied_from": origin, "destination_project_id": project}
        self._store.copy_to_job(kind, path, run_id, ttl_seconds=ttl, metadata=extra)
        return tinker_compat.tinker_path(run_id, kind, source.name)

    # ------------------------------------------------------------------ downloads

    async def _urls(self, request: web.Request) -> web.Response:
        kind, name = self._named(request)
        if kind != "external":
            raise RestError(400, "only external_weights checkpoints have download URLs")
        try:
            files = await asyncio.to_thread(self._store.files, kind, name)
        except FileNotFoundError as exc:
            raise RestError(404, str(exc)) from None
        expires = int(time.time()) + URL_LIFETIME_SECONDS
        base = f"{request.url.origin()}{_DOWNLOAD_PREFIX}"
        urls = {
            relative: f"{base}{name}/{urllib.parse.quote(relative, safe='')}?"
            + urllib.parse.urlencode(
                {"expires": expires, "signature": self._sign(name, relative, expires)}
            )
            for relative in files
        }
        return self._json({"urls": urls, "expires": _iso(expires)})

    def _sign(self, name: str, relative: str, expires: int) -> str:
        message = f"{self._store.job_id}\n{name}\n{relative}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def signed(self, request: web.Request) -> bool:
        """Whether a download request carries a valid, unexpired signature (checked by
        the server in place of the API key)."""
        name, relative = request.match_info.get("name"), request.match_info.get("file")
        expires, signature = request.query.get("expires", ""), request.query.get("signature", "")
        if name is None or relative is None or not expires.isdigit():
            return False
        expected = self._sign(name, relative, int(expires))
        return hmac.compare_digest(expected, signature) and int(expires) > time.time()

    async def _download(self, request: web.Request) -> web.StreamResponse:
        name, relative = request.match_info["name"], request.match_info["file"]
        try:
            validate_name(name)
            files = await asyncio.to_thread(self._store.files, "external", name)
        except (ValueError, FileNotFoundError):
            raise RestError(404, f"no external weights named {name!r}") from None
        path = files.get(relative)  # only the export's own files, never a path built here
        if path is None:
            raise RestError(404, f"external weights {name!r} have no file {relative!r}")
        return web.FileResponse(path)

    # ------------------------------------------------------------------ sessions

    async def _list_sessions(self, request: web.Request) -> web.Response:
        limit, offset = _page(request, 20)
        ids = sorted(self._registry.sessions)
        return self._json({"sessions": ids[offset : offset + limit]})

    async def _get_session(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        session = self._registry.sessions.get(session_id)
        if session is None:
            raise RestError(404, f"session_id: unknown session {session_id!r}")
        samplers = sorted(
            s.sampling_session_id
            for s in self._registry.sampling.values()
            if s.session_id == session_id
        )
        return self._json(
            {
                "training_run_ids": sorted(session.models),
                "sampler_ids": samplers,
                "user_metadata": session.user_metadata,
                "display_name": None,
            }
        )


def _page(request: web.Request, default_limit: int) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", default_limit))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise RestError(400, "limit and offset must be integers") from None
    if limit < 1 or offset < 0:
        raise RestError(400, f"limit must be >= 1 and offset >= 0, got {limit} and {offset}")
    return limit, offset


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise RestError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise RestError(400, "the body must be a JSON object")
    return body


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()

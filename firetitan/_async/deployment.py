"""`AsyncDeployment`: one inference deployment that hot-loads trainer snapshots.

It loads a snapshot by identity and returns once **every** replica serves it
(deployment.md §4). Where the reference client differs, on purpose:

* success needs every replica ready on the identity, not only ``replicas[0]``; an
  ``error`` stage for the identity on *any* replica fails at once with `HotLoadError`
  naming that replica and its message; a timeout raises `HotLoadTimeoutError` with what
  each replica showed last;
* a delta is never sent unless every replica holds the snapshot it applies to (checked
  here, before the request): otherwise the deployment would be asked to apply it to the
  wrong weights;
* ``hot_load(..., unless_serving=True)`` sends nothing when the deployment already
  serves the snapshot;
* polls start fast (0.1 s) and slow down to ``poll_interval``, instead of a fixed 5 s.

The ``POST`` is retried by the transport (the deployment treats a repeated load of the
same identity as one); a deployment that refuses ``reset_prompt_cache`` is asked again
without it, and that is remembered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import attrs

from firetitan import _wire
from firetitan._async._checks import non_empty_str
from firetitan._async._once import Once
from firetitan._concurrency import AdaptiveLimit
from firetitan._config import ClientConfig, DeploymentConfig, resolve_api_key
from firetitan._errors import (
    APIResponseValidationError,
    BadRequestError,
    HotLoadError,
    HotLoadTimeoutError,
)
from firetitan._transport import Transport
from firetitan._unpicklable import Unpicklable
from firetitan._wire import endpoints

__all__ = ["AsyncDeployment"]

log = logging.getLogger("firetitan.deployment")

_FIRST_POLL_S = 0.1


class AsyncDeployment(Unpicklable):
    """A hot-load inference deployment: load snapshots, read what it serves.

    Args:
        config: Where the deployment is and how long hot-loads may take.
        api_key: Its key; None reads ``FIRETITAN_API_KEY``, ``FIREWORKS_API_KEY``,
            then ``TINKER_API_KEY``. Never shown in reprs, logs or errors.
        client_config: Timeouts and retries of its requests.

    Raises:
        ValueError: No API key could be found.
    """

    _unpicklable = "a deployment client holds live connections and cannot be pickled"

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        api_key: str | None = None,
        client_config: ClientConfig | None = None,
    ) -> None:
        if not isinstance(config, DeploymentConfig):
            raise TypeError("config must be a firetitan.DeploymentConfig")
        self._config = config
        base = client_config or ClientConfig()
        # Enough pooled connections for every completion the limit lets through.
        limits = attrs.evolve(base.limits, max_connections=config.max_concurrency)
        self._transport = Transport(
            config.base_url,
            resolve_api_key(api_key),
            base.evolve(limits=limits),
            bearer=True,
        )
        self._limit = AdaptiveLimit(config.max_concurrency)
        self._account: Once[str] = Once(self._find_account, config.account)
        self._reset_prompt_cache = True

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> DeploymentConfig:
        """Where the deployment is."""
        return self._config

    @property
    def concurrency_limit(self) -> int:
        """Completions allowed in flight now (halved on overload, growing back after)."""
        return self._limit.limit

    def __repr__(self) -> str:
        return f"<AsyncDeployment {self._config.deployment_id!r} at {self._config.base_url!r}>"

    # ------------------------------------------------------------------ identity

    async def model(self) -> str:
        """The deployment's resource name, ``accounts/<acct>/deployments/<id>``, which
        completions name as their ``model``.

        Raises:
            APIResponseValidationError: The key belongs to no account or to several.
            APIError: The control plane could not answer.
        """
        return f"accounts/{await self.account()}/deployments/{self._config.deployment_id}"

    async def account(self) -> str:
        """The account id: the configured one, or the one the API key belongs to.

        Raises:
            APIResponseValidationError: The key belongs to no account or to several.
            APIError: The control plane could not answer.
        """
        return await self._account.get()

    async def _find_account(self) -> str:
        accounts = endpoints.LIST_ACCOUNTS
        names = await self._transport.call(accounts, path=f"{accounts.path}?pageSize=2")
        if len(names) != 1:
            raise APIResponseValidationError(
                f"the API key belongs to {len(names)} accounts, not exactly one: "
                "set DeploymentConfig(account=...)"
            )
        return names[0].removeprefix("accounts/")

    # ------------------------------------------------------------------ hot-load

    async def status(self, *, base_model: str | None = None) -> list[_wire.ReplicaStatus]:
        """What each replica serves and is loading, in the deployment's order.

        Args:
            base_model: The served model; None uses the configuration's.

        Raises:
            APIResponseValidationError: The answer has no replicas list.
            APIError: The deployment could not answer.
        """
        return await self._transport.call(
            endpoints.HOT_LOAD_STATUS, headers=await self._headers(base_model)
        )

    async def serving(self, *, base_model: str | None = None) -> str | None:
        """The snapshot every replica is ready on, or None (no replicas, a replica not
        ready, or replicas on different snapshots).

        Raises:
            APIError: The deployment could not answer.
        """
        replicas = await self.status(base_model=base_model)
        identities = {r.identity if r.ready else None for r in replicas}
        return identities.pop() if len(identities) == 1 else None

    async def hot_load(
        self,
        identity: str,
        *,
        previous: str | None = None,
        base_model: str | None = None,
        time_limit: float | None = None,
        unless_serving: bool = False,
    ) -> bool:
        """Load a snapshot and return once every replica serves it.

        Args:
            identity: The snapshot (``SaveSamplerResult.snapshot_name``).
            previous: For a delta snapshot, the snapshot it applies to; every replica
                must hold it, or nothing is sent. None for a base snapshot.
            base_model: The served model; None uses the configuration's.
            time_limit: Seconds to wait; None uses ``hot_load_timeout``.
            unless_serving: Send nothing when every replica already serves
                ``identity``.

        Returns:
            Whether a hot-load was sent (always, unless ``unless_serving``).

        Raises:
            HotLoadError: A replica reported that loading ``identity`` failed (an
                unknown snapshot, a delta that does not apply...), or ``previous`` is
                not what the deployment holds.
            HotLoadTimeoutError: Not every replica served it within ``time_limit``.
            APIError: The deployment refused the request or could not be reached.
        """
        non_empty_str(identity, "identity")
        limit = self._config.hot_load_timeout if time_limit is None else time_limit
        headers = await self._headers(base_model)
        if unless_serving and await self.serving(base_model=base_model) == identity:
            return False
        if previous is not None:
            replicas = await self.status(base_model=base_model)
            if not replicas or not all(r.serves(previous) for r in replicas):
                raise HotLoadError(
                    f"not hot-loading delta {identity!r}: it applies to {previous!r}, which "
                    f"the deployment does not hold ({_describe(replicas)}); load a base "
                    "snapshot first",
                    identity=identity,
                    replicas=replicas,
                )
        await self._post(identity, previous, headers)
        await self._wait(identity, base_model, limit)
        return True

    async def _headers(self, base_model: str | None) -> dict[str, str]:
        model = base_model or self._config.base_model
        if not model:
            raise ValueError(
                "the deployment's base model is unknown: give base_model= or set "
                "DeploymentConfig(base_model=...)"
            )
        deployment = await self.model()
        return {"fireworks-deployment": deployment, "fireworks-model": model}

    async def _post(self, identity: str, previous: str | None, headers: dict[str, str]) -> None:
        body = _wire.hot_load_body(
            identity, previous=previous, reset_prompt_cache=self._reset_prompt_cache
        )
        try:
            await self._transport.call(endpoints.HOT_LOAD, body, headers=headers)
        except BadRequestError as exc:
            text = str(exc).lower()
            if not (
                self._reset_prompt_cache
                and "reset_prompt_cache" in text
                and "extra inputs are not permitted" in text
            ):
                raise
            log.info("the deployment refuses reset_prompt_cache; hot-loading without it")
            self._reset_prompt_cache = False
            body.pop("reset_prompt_cache", None)
            await self._transport.call(endpoints.HOT_LOAD, body, headers=headers)

    async def _wait(self, identity: str, base_model: str | None, limit: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        interval = _FIRST_POLL_S
        while True:
            replicas = await self.status(base_model=base_model)
            if replicas and all(r.serves(identity) for r in replicas):
                log.info("deployment %s serves %s", self._config.deployment_id, identity)
                return
            failed = [r for r in replicas if r.failed(identity)]
            if failed:
                raise HotLoadError(
                    f"hot-loading {identity!r} failed on {len(failed)} of {len(replicas)} "
                    f"replicas: {_describe(replicas)}",
                    identity=identity,
                    replicas=replicas,
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HotLoadTimeoutError(
                    f"hot-loading {identity!r}: not every replica served it within "
                    f"{limit:g} s; last status: {_describe(replicas)}",
                    identity=identity,
                    replicas=replicas,
                )
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, self._config.poll_interval)

    # ------------------------------------------------------------------ sampling

    async def _complete(
        self, body: dict[str, Any], fold: Callable[[], _wire.CompletionStream]
    ) -> _wire.Completion:
        """One streamed completion, retried (under one ``x-request-id``) and limited
        by the transport; see `AsyncDeploymentSampler`."""
        return await self._transport.stream(
            endpoints.COMPLETIONS.path,
            body,
            fold,
            headers={"x-request-id": secrets.token_hex(16)},
            limit=self._limit,
        )

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Close the connections. Calling it again does nothing."""
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncDeployment:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _describe(replicas: list[_wire.ReplicaStatus]) -> str:
    if not replicas:
        return "no replicas"
    return "; ".join(r.describe() for r in replicas)

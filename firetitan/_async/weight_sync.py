"""`AsyncWeightSyncer`: save a sampler snapshot and hot-load it, keeping the chain.

The chain is what the trainer and the deployment both hold, so it is read from them,
not remembered: a delta is exported only when every replica serves the export the
trainer will diff it against (`AsyncFiretitanTrainingClient.next_checkpoint_type`);
anything else (the first save, a restart of either side, an export that was never
hot-loaded, replicas that disagree) exports a base. Each delta is hot-loaded naming the
snapshot it applies to. A syncer built after a restart therefore just continues.
"""

from __future__ import annotations

from firetitan._async.deployment import AsyncDeployment
from firetitan._async.training import AsyncFiretitanTrainingClient
from firetitan._errors import ClientUsageError
from firetitan._read_only import ReadOnly
from firetitan._types import SaveSamplerResult

__all__ = ["AsyncWeightSyncer"]


class AsyncWeightSyncer:
    """Keeps a deployment serving a training client's latest weights.

    Args:
        training_client: The model whose weights are exported.
        deployment: Where they are hot-loaded; None uses the one configured on the
            training client's service client.

    Raises:
        ClientUsageError: No deployment given or configured.
    """

    def __init__(
        self,
        training_client: AsyncFiretitanTrainingClient,
        deployment: AsyncDeployment | None = None,
    ) -> None:
        deployment = deployment or training_client._service.deployment
        if deployment is None:
            raise ClientUsageError(
                "no deployment: pass one, or configure deployment= on the service client"
            )
        self._client = training_client
        self._deployment = deployment

    deployment: ReadOnly[AsyncDeployment] = ReadOnly(
        "_deployment", "The deployment snapshots are hot-loaded into."
    )

    def __repr__(self) -> str:
        return f"<AsyncWeightSyncer {self._client.model_id!r} -> {self._deployment!r}>"

    async def save_and_hot_load(
        self, name: str, *, ttl_seconds: int | None = None
    ) -> SaveSamplerResult:
        """Export the current weights as snapshot ``<name>-<session>`` and return once
        every replica serves it.

        Args:
            name: The export's base name (the training client appends its suffix).
            ttl_seconds: Delete the export after this many seconds; None keeps it.

        Returns:
            The export's trainer path and snapshot name (the hot-loaded identity).

        Raises:
            RequestFailedError: The trainer could not export.
            HotLoadError: The deployment did not load it (`HotLoadTimeoutError`: not
                in time).
            APIError: The deployment could not be reached.
        """
        client = self._client
        kind = await client.next_checkpoint_type(self._deployment)
        result = await client.save_weights_for_sampler_ext(name, kind, ttl_seconds)
        _, previous = client.delta_base(result.snapshot_name)
        await self._deployment.hot_load(
            result.snapshot_name, previous=previous, base_model=client.base_model
        )
        return result

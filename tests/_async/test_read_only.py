"""`ReadOnly` attributes: what they show, that they refuse assignment, and that every
one the clients declare names a value that is there."""

from __future__ import annotations

import pytest

from firetitan import (
    AsyncDeployment,
    AsyncDeploymentSampler,
    AsyncFiretitanServiceClient,
    AsyncFiretitanTrainingClient,
    AsyncWeightSyncer,
    DeploymentConfig,
)
from firetitan._read_only import ReadOnly


class _Spec:
    def __init__(self) -> None:
        self.rank = 8


class _Holder:
    name: ReadOnly[str] = ReadOnly("_name", "The holder's name.")
    rank: ReadOnly[int] = ReadOnly("_spec.rank", "The rank in the spec.")

    def __init__(self) -> None:
        self._name = "h"
        self._spec = _Spec()


def test_a_read_only_attribute_shows_its_path_and_refuses_assignment() -> None:
    holder = _Holder()
    assert (holder.name, holder.rank) == ("h", 8)
    holder._spec.rank = 4
    assert holder.rank == 4  # read on each access, never copied
    with pytest.raises(AttributeError, match="rank is read-only"):
        holder.rank = 2  # type: ignore[assignment]
    assert holder.rank == 4
    assert isinstance(_Holder.name, ReadOnly) and _Holder.name.__doc__ == "The holder's name."


def _read_all(obj: object) -> int:
    """Read every `ReadOnly` attribute of ``obj``'s class; return how many there are."""
    names = [n for n, m in vars(type(obj)).items() if isinstance(m, ReadOnly)]
    for name in names:
        getattr(obj, name)
    return len(names)


@pytest.mark.asyncio
async def test_every_read_only_attribute_of_the_clients_reads(
    service: AsyncFiretitanServiceClient, tc: AsyncFiretitanTrainingClient
) -> None:
    sampler = await tc.save_weights_and_get_sampling_client("read-only")
    # Built without a network: nothing here is sent to the (absent) deployment.
    deployment = AsyncDeployment(
        DeploymentConfig(base_url="http://127.0.0.1:9", deployment_id="d"), api_key="k"
    )
    clients = (
        service,
        service._transport,
        tc,
        sampler,
        deployment,
        AsyncDeploymentSampler(deployment),
        AsyncWeightSyncer(tc, deployment),
    )
    read = [_read_all(obj) for obj in clients]
    assert all(read), read
    await deployment.aclose()

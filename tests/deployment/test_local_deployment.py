"""`LocalDeployment` (``firetitan deploy`` in a child process) and
``LocalTrainer(deployment=True)``: the public interface, end to end over HTTP."""

from __future__ import annotations

import asyncio
import json
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from shared import BASE_MODEL

from firetitan.local import LocalDeployment, LocalTrainer


def _call(url: str, key: str, body: Any = None, **headers: str) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"X-Api-Key": key, **headers})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_local_trainer_starts_a_deployment_beside_it() -> None:
    with LocalTrainer("null", base_model=BASE_MODEL, deployment=True) as trainer:
        dep = trainer.deployment
        assert dep.api_key == trainer.api_key
        assert dep.model == "accounts/local/deployments/local-deployment"
        assert (dep.account, dep.deployment_id) == ("local", "local-deployment")
        assert dep.checkpoint_dir == trainer.checkpoint_dir
        assert dep.api_key not in repr(dep)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(dep)
        accounts = _call(f"{dep.base_url}/v1/accounts?pageSize=2", dep.api_key)
        assert accounts["accounts"] == [{"name": "accounts/local"}]
        answer = _call(
            f"{dep.base_url}/inference/v1/completions",
            dep.api_key,
            {"model": dep.model, "prompt": [1, 2], "max_tokens": 4, "temperature": 0.0},
        )
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        status = _call(
            f"{dep.base_url}/hot_load/v1/models/hot_load",
            dep.api_key,
            **{"fireworks-deployment": dep.model, "fireworks-model": BASE_MODEL},
        )
        assert status["replicas"][0]["readiness"] is True
        assert "loading_state" not in status["replicas"][0]
        url = dep.base_url
    with pytest.raises(OSError):  # stopped with the trainer
        _call(f"{url}/v1/accounts", "x")
    with pytest.raises(RuntimeError, match="deployment=True"):
        _ = trainer.deployment


def test_async_context_and_options(tmp_path: Path) -> None:
    async def main() -> None:
        async with LocalDeployment(
            tmp_path, BASE_MODEL, api_key="tml-k", account="acct", deployment_id="dep"
        ) as dep:
            assert dep.model == "accounts/acct/deployments/dep"
            resource = _call(f"{dep.base_url}/v1/accounts/acct/deployments/dep", "tml-k")
            assert resource["baseModel"] == BASE_MODEL

    asyncio.run(main())


def test_a_failed_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        LocalDeployment(tmp_path / "missing", BASE_MODEL).start()


def test_deploy_access_log_names_each_request_never_the_key(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path, BASE_MODEL, access_log=True) as dep:
        _call(f"{dep.base_url}/v1/accounts?pageSize=2", dep.api_key)
        with pytest.raises(urllib.error.HTTPError):
            _call(f"{dep.base_url}/v1/accounts", "wrong-key")
        output = dep.output()
    assert "INFO firetitan.access: GET /v1/accounts 200 " in output
    assert "INFO firetitan.access: GET /v1/accounts 401 " in output
    assert dep.api_key not in output

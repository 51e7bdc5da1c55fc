"""Results in the encoding a poll asks for (`firetitan.local.executor.Result`), without a
server: which encodings a result offers, that each is made once, and what a poll gets
when the encoding it asks for cannot be made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from firetitan._wire import WireError
from firetitan.local.config import ServerConfig
from firetitan.local.executor import Executor, Result, success_result


class Counting:
    """An encoder that counts its calls."""

    def __init__(self, out: bytes, fail: bool = False) -> None:
        self.out = out
        self.fail = fail
        self.calls = 0

    def __call__(self, value: Any) -> bytes:
        self.calls += 1
        if self.fail:
            raise WireError("metrics", "a key the protobuf cannot carry")
        return self.out


def test_json_only_results() -> None:
    result = success_result({"type": "save_weights", "path": "p"})
    assert result.offers("json") and not result.offers("protobuf")
    assert orjson.loads(result.encode("json")) == {"type": "save_weights", "path": "p"}
    with pytest.raises(KeyError):
        result.encode("protobuf")


def test_each_encoding_is_made_once() -> None:
    as_json, as_proto = Counting(b"{}"), Counting(b"\x08\x01")
    result = Result(object(), {"json": as_json, "protobuf": as_proto})
    assert result.cached("protobuf") is None
    assert result.encode("protobuf") == result.encode("protobuf") == b"\x08\x01"
    assert result.cached("protobuf") == b"\x08\x01"
    assert (as_json.calls, as_proto.calls) == (0, 1)


@pytest_asyncio.fixture
async def executor() -> AsyncIterator[Executor]:
    executor = Executor(ServerConfig(long_poll_seconds=5.0))
    executor.start()
    yield executor
    await executor.close()


@pytest.mark.asyncio
async def test_polls_get_what_they_ask_for(executor: Executor) -> None:
    result = Result(None, {"json": Counting(b'{"ok": 1}'), "protobuf": Counting(b"\x08\x01")})
    request_id = executor.submit("forward", _returning(result))
    assert await executor.retrieve(request_id, encoding="protobuf") == (b"\x08\x01", "protobuf")
    assert await executor.retrieve(request_id, encoding="json") == (b'{"ok": 1}', "json")
    # A JSON-only result answers a protobuf poll in JSON.
    plain = executor.submit("optim_step", _returning(success_result({"metrics": {}})))
    body, encoding = await executor.retrieve(plain, encoding="protobuf")
    assert encoding == "json" and orjson.loads(body) == {"metrics": {}}


@pytest.mark.asyncio
async def test_an_encoding_that_fails_at_poll_time_fails_the_poll(executor: Executor) -> None:
    result = Result(None, {"json": Counting(b'{"ok": 1}'), "protobuf": Counting(b"", fail=True)})
    request_id = executor.submit("forward", _returning(result))
    body, encoding = await executor.retrieve(request_id, encoding="protobuf")
    assert encoding == "json"
    outcome = orjson.loads(body)
    assert outcome["category"] == "server"
    assert "protobuf" in outcome["error"] and "metrics" in outcome["error"]
    # The JSON form is still served.
    assert await executor.retrieve(request_id) == (b'{"ok": 1}', "json")


def _returning(result: Result) -> Any:
    async def run() -> Result:
        return result

    return run

"""Security: authentication, names and paths, size limits, secrets, TLS, binding.

* Every route the trainer's router knows (read from the router, so a new endpoint is
  covered the day it is added) answers 401 to a missing or wrong key, before routing
  says anything else; the key is compared with `hmac.compare_digest`.
* Checkpoint and snapshot names and paths with ``..``, separators, absolute paths, NUL,
  odd unicode, other schemes (``cross_job://`` and ``tinker://`` variants included) are
  refused by the client before anything is sent and by the trainer at every field that
  takes one; nothing is written or read outside the checkpoint root.
* The request size limit holds on every POST route, with and without Content-Length.
* The API key appears in no log line (the trainer's and the client's, at DEBUG), repr,
  exception text (whole chains and tracebacks), pickle or ``firetitan serve`` output.
* The client verifies TLS certificates by default (and does not retry a certificate it
  cannot trust), and never follows a redirect that would carry the key elsewhere.
* ``firetitan serve`` binds loopback unless told otherwise, and warns when it is told.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ipaddress
import json
import logging
import pickle
import re
import shutil
import ssl
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faults import FaultPlan
from hypothesis import given
from hypothesis import strategies as st
from shared import BASE_MODEL, FAST_TRAINER, connect, proxied

from firetitan import (
    APIConnectionError,
    APIResponseValidationError,
    AuthenticationError,
    ClientConfig,
    FiretitanError,
    FiretitanServiceClient,
    RetryPolicy,
)
from firetitan.local import LocalTrainer
from firetitan.local.checkpoints import MANIFEST_NAME
from firetitan.local.null_engine import NullEngine

from .common import ADAM, HAS_PROC, serve, sft_batch
from .conftest import Figures, Scale, scales
from .hostile import RawClient, fuzz_settings, unsafe_names

KEY = "tml-reliability-security-key-5f1e9c"
WRONG_KEY = "tml-reliability-wrong-key-0000000"
QUICK_CLIENT = ClientConfig(
    retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.1, deadline=5.0, max_retry_after=0.1),
    future_deadline=60.0,
    heartbeat_interval=0.2,
)

# --------------------------------------------------------------------------- auth


def _wrong_keys(key: str) -> dict[str, dict[str, str]]:
    return {
        "missing": {},
        "empty": {"X-API-Key": ""},
        "wrong, same length": {"X-API-Key": "x" * len(key)},
        "wrong, other length": {"X-API-Key": WRONG_KEY},
        "prefix": {"X-API-Key": key[:-1]},
        "extended": {"X-API-Key": key + "0"},
        "other case": {"X-API-Key": key.upper()},
        "non-ascii": {"X-API-Key": key[:-1] + "\xe9"},
        "in another header": {"Authorization": f"Bearer {key}"},
    }


def _route_paths(trainer: LocalTrainer) -> list[tuple[str, str]]:
    """Every (method, path) the trainer's router serves, placeholders filled in."""
    app = trainer.server.make_app()
    routes = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), info
        routes.append((route.method, re.sub(r"\{[^}]+\}", "x", path)))
    return sorted(set(routes))


@pytest.mark.asyncio
async def test_every_route_refuses_a_missing_or_wrong_key(
    monkeypatch: pytest.MonkeyPatch, figures: Figures
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    # The server looks hmac.compare_digest up at call time: every check is seen here.
    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with (
        LocalTrainer("null", api_key=KEY, debug_endpoints=True, **FAST_TRAINER) as trainer,
        aiohttp.ClientSession() as http,
    ):
        routes = _route_paths(trainer)
        routes += [("GET", "/api/v1/no_such_endpoint"), ("POST", "/"), ("PUT", "/api/v1/forward")]
        assert len(routes) >= 20, routes
        refused = 0
        with_header = 0
        for method, path in routes:
            for variant, headers in _wrong_keys(KEY).items():
                data = b"{}" if method != "GET" else None
                async with http.request(
                    method, trainer.base_url + path, data=data, headers=headers
                ) as resp:
                    assert resp.status == 401, (method, path, variant, resp.status)
                    assert resp.content_type == "application/json"
                    body = await resp.json()
                assert "X-API-Key" in body["detail"] and body["error_class"] == (
                    "AuthenticationError"
                )
                assert KEY not in str(body)
                refused += 1
                with_header += "X-API-Key" in headers
            # Positive control: the right key gets past authentication.
            async with http.request(
                method,
                trainer.base_url + path,
                data=b"{}" if method != "GET" else None,
                headers={"X-API-Key": KEY},
            ) as resp:
                assert resp.status != 401, (method, path)
    # Constant time: every request that carried a key was checked by compare_digest,
    # against the key's bytes.
    checks = [c for c in compared if c[1] == KEY.encode()]
    assert len(checks) >= with_header + len(routes)
    figures.record(
        "security: authentication",
        engine="null",
        routes=len(routes),
        refused_401=refused,
        constant_time_compares=len(checks),
    )


# --------------------------------------------------------------------------- names


def _tree(root: Path) -> set[str]:
    """Every path under ``root``, checkpoint scratch space (``.tmp``) left out."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" not in p.parts}


_PATH_FIELDS = [
    ("save_weights", "path"),
    ("load_weights", "path"),
    ("save_weights_for_sampler", "path"),
    ("load_weights (creates a model)", "path"),
    ("create_sampling_session", "model_path"),
    ("asample", "model_path"),
]


@pytest.mark.parametrize("scale", scales(short={"cases": 60}, long={"cases": 400}))
def test_unsafe_checkpoint_names_never_touch_the_file_system(
    scale: Scale, tmp_path: Path, figures: Figures
) -> None:
    root = tmp_path / "root"
    with LocalTrainer(
        "null", api_key=KEY, checkpoint_dir=root, job_id="names-job", **FAST_TRAINER
    ) as trainer:
        api = RawClient(trainer.base_url, KEY)
        try:
            session = api.post("create_session", {"sdk_version": "0.23.0"}).json["session_id"]
            create = api.submit(
                "create_model", {"session_id": session, "model_seq_id": 0, "base_model": BASE_MODEL}
            )
            model = api.result(create)["model_id"]
            seq = 1
            api.result(
                api.submit("save_weights", {"model_id": model, "seq_id": seq, "path": "good"})
            )
            # A copy of a real checkpoint outside the root, and one in another job under
            # it: traversal must not reach the first; cross_job:// reaches the second.
            good = root / "names-job" / "state" / "good"
            shutil.copytree(good, tmp_path / "stolen-job" / "state" / "stolen")
            shared = root / "other-job" / "state" / "shared"
            shutil.copytree(good, shared)
            # A checkpoint is valid only where its manifest says it was committed.
            manifest = json.loads((shared / MANIFEST_NAME).read_text())
            manifest.update(job_id="other-job", name="shared")
            (shared / MANIFEST_NAME).write_text(json.dumps(manifest))
            before = _tree(tmp_path)
            tally: dict[str, int] = {f"{e}.{f}": 0 for e, f in _PATH_FIELDS}
            seq_box = [seq]
            model_seq = [1]

            def attempt(endpoint: str, field: str, name: Any) -> None:
                seq_box[0] += 1
                ordered = {"model_id": model, "seq_id": seq_box[0]}
                bodies = {
                    "save_weights": ("save_weights", {**ordered, "path": name}),
                    "load_weights": ("load_weights", {**ordered, "path": name, "optimizer": True}),
                    "save_weights_for_sampler": (
                        "save_weights_for_sampler",
                        {**ordered, "path": name},
                    ),
                    "load_weights (creates a model)": (
                        "load_weights",
                        {
                            "session_id": session,
                            "model_seq_id": model_seq[0],
                            "path": name,
                            "optimizer": False,
                        },
                    ),
                    "create_sampling_session": (
                        "create_sampling_session",
                        {
                            "session_id": session,
                            "sampling_session_seq_id": model_seq[0],
                            "model_path": name,
                        },
                    ),
                    "asample": (
                        "asample",
                        {
                            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                            "sampling_params": {"max_tokens": 1},
                            "model_path": name,
                        },
                    ),
                }
                path, body = bodies[endpoint]
                model_seq[0] += 1
                answer = api.post(path, body)
                if answer.status == 200 and endpoint == "create_sampling_session":
                    # A well-formed path is only looked up when sampled from.
                    answer = api.post(
                        "asample",
                        {
                            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                            "sampling_params": {"max_tokens": 1},
                            "sampling_session_id": answer.json["sampling_session_id"],
                        },
                    )
                    assert answer.status == 200, answer
                if answer.status == 200:
                    # Accepted (a well-formed path to nothing): it must fail to find it.
                    outcome = api.outcome(answer.json["request_id"])
                    assert outcome.get("category") == "user", (endpoint, name, outcome)
                else:
                    assert answer.status in (400, 404, 422), (endpoint, name, answer)
                    assert field in answer.json["detail"], (endpoint, name, answer.json)
                tally[f"{endpoint}.{field}"] += 1

            @fuzz_settings(scale.cases, scale)
            @given(
                name=unsafe_names()
                | st.sampled_from(
                    [
                        "../stolen-job/state/stolen",
                        "../../stolen-job/state/stolen",
                        str(tmp_path / "stolen-job" / "state" / "stolen"),
                        "cross_job://../stolen-job/stolen",
                        "cross_job://stolen-job/stolen",
                        "tinker://stolen-job/weights/stolen",
                        "tinker://../weights/stolen",
                    ]
                )
            )
            def fuzz(name: str) -> None:
                for endpoint, field in _PATH_FIELDS:
                    attempt(endpoint, field, name)

            fuzz()
            # Nothing appeared, vanished or moved anywhere, inside the root or outside.
            assert _tree(tmp_path) == before
            # Positive control: a legitimate cross-job load works.
            seq_box[0] += 1
            api.result(
                api.submit(
                    "load_weights",
                    {
                        "model_id": model,
                        "seq_id": seq_box[0],
                        "path": "cross_job://other-job/shared",
                        "optimizer": True,
                    },
                )
            )
            assert api.healthy()
        finally:
            api.close()
    figures.record(
        f"security: unsafe names at the trainer ({scale.name})",
        engine="null",
        names=scale.cases,
        attempts=sum(tally.values()),
        fields=len(tally),
        files_touched_outside_root=0,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("scale", scales(short={"cases": 150}, long={"cases": 1000}))
async def test_the_client_refuses_unsafe_names_before_sending(
    scale: Scale, figures: Figures
) -> None:
    async with (
        LocalTrainer("null", api_key=KEY, **FAST_TRAINER) as trainer,
        proxied(trainer, config=QUICK_CLIENT) as (proxy, service),
    ):
        tc = await service.create_training_client(BASE_MODEL)
        sent = len(proxy.records)
        calls = {
            "save_state": lambda n: tc.save_state(n),
            "load_state": lambda n: tc.load_state(n),
            "load_state_with_optimizer": lambda n: tc.load_state_with_optimizer(n),
            "save_weights_for_sampler": lambda n: tc.save_weights_for_sampler(n),
            "resolve_checkpoint_path": lambda n: tc.resolve_checkpoint_path(n),
            "resolve_checkpoint_path (job)": lambda n: tc.resolve_checkpoint_path("ok", n),
            "resolve_checkpoint_path (name)": lambda n: tc.resolve_checkpoint_path(n, "job"),
        }
        refused = 0

        # Runs synchronously on the loop: the checks raise before any await.
        @fuzz_settings(scale.cases, scale)
        @given(name=unsafe_names())
        def fuzz(name: str) -> None:
            nonlocal refused
            for what, call in calls.items():
                with pytest.raises(ValueError) as info:
                    call(name)
                assert str(info.value), what
                refused += 1

        fuzz()
        await asyncio.sleep(0.1)
        requests = [r.path for r in proxy.records[sent:]]
        assert not [p for p in requests if "heartbeat" not in p], requests
        # A sampler path may have any form a remote trainer hands out, so the client
        # passes it on; the trainer refuses it by name.
        with pytest.raises(FiretitanError, match="model_path"):
            await service.create_sampling_client(model_path="../x")
    figures.record(
        f"security: unsafe names at the client ({scale.name})",
        engine="null",
        names=scale.cases,
        refused_before_sending=refused,
        requests_sent=0,
    )


# --------------------------------------------------------------------------- size limit


async def _chunks(size: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < size:
        piece = min(16 * 1024, size - sent)
        yield b" " * piece
        sent += piece


@pytest.mark.asyncio
async def test_the_request_size_limit_holds_on_every_route(figures: Figures) -> None:
    limit = 8 * 1024
    async with (
        LocalTrainer("null", api_key=KEY, max_request_bytes=limit, **FAST_TRAINER) as trainer,
        aiohttp.ClientSession() as http,
    ):
        posts = [p for m, p in _route_paths(trainer) if m == "POST"]
        headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
        for path in posts:
            at_limit = b'{"pad": "' + b"x" * (limit - 11) + b'"}'
            assert len(at_limit) == limit
            over = at_limit[:-2] + b'x"}'
            for body, expect_413 in ((over, True), (at_limit, False)):
                async with http.post(trainer.base_url + path, data=body, headers=headers) as r:
                    assert (r.status == 413) == expect_413, (path, len(body), r.status)
                    assert r.content_type == "application/json"
                    if expect_413:
                        assert (await r.json())["error_class"] == "RequestTooLargeError"
            # No Content-Length: the limit is enforced while reading.
            async with http.post(
                trainer.base_url + path, data=_chunks(4 * limit), headers=headers
            ) as r:
                assert r.status == 413, path
        async with http.get(trainer.base_url + "/api/v1/healthz", headers=headers) as r:
            assert r.status == 200
    figures.record(
        "security: request size limit",
        engine="null",
        post_routes=len(posts),
        oversize_refused=2 * len(posts),
    )


# --------------------------------------------------------------------------- secrets


class _BrokenEngine(NullEngine):
    def optim_step(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        raise RuntimeError("the device fell off the bus")


def _exception_texts(exc: BaseException) -> Iterator[str]:
    """Everything an exception can show: its text, repr, traceback (whole chain),
    attributes, and its pickle."""
    yield "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(vars(current))
        try:
            yield repr(pickle.dumps(current))
        except Exception as refused:  # unpicklable: then its message must be clean
            yield str(refused)
        current = current.__cause__ or current.__context__


@pytest.mark.asyncio
async def test_the_key_appears_in_no_log_repr_exception_or_pickle(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, figures: Figures
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the trainer's and aiohttp's included
    texts: list[str] = []
    log_file = tmp_path / "executed.jsonl"
    async with (
        LocalTrainer(
            _BrokenEngine(), api_key=KEY, execution_log_path=log_file, **FAST_TRAINER
        ) as trainer,
        proxied(trainer, FaultPlan(rate=0.3, seed=5, delay=0.3), QUICK_CLIENT) as (
            proxy,
            service,
        ),
    ):
        texts += [repr(trainer), repr(trainer.server), repr(service), repr(proxy)]
        tc = await service.create_training_client(BASE_MODEL)
        futures = [tc.forward_backward(sft_batch(i), "cross_entropy") for i in range(10)]
        futures.append(tc.optim_step(ADAM))  # fails on the trainer: a server error
        futures.append(tc.forward(sft_batch(0), "no_such_loss"))  # fails: a user error
        futures.append(tc.load_state("never-saved"))
        for future in futures:
            texts.append(repr(future))
            try:
                await future
            except FiretitanError as exc:
                texts.extend(_exception_texts(exc))
        for thing in (service, tc, trainer):
            with pytest.raises(TypeError) as refused:
                pickle.dumps(thing)
            texts.extend(_exception_texts(refused.value))
        # A wrong key, through the async core and the sync facade.
        proxy.set_rate(0.0)
        wrong = connect(proxy.base_url, WRONG_KEY, QUICK_CLIENT)
        texts.append(repr(wrong))
        with pytest.raises(AuthenticationError) as denied:
            async with wrong:
                pass
        texts.extend(_exception_texts(denied.value))

        def facade() -> None:
            with FiretitanServiceClient(
                base_url=trainer.base_url, api_key=KEY, config=QUICK_CLIENT
            ) as sync_service:
                sync_tc = sync_service.create_training_client(BASE_MODEL, seed=1)
                texts.extend([repr(sync_service), repr(sync_tc)])
                for thing in (sync_service, sync_tc):
                    with pytest.raises(TypeError) as refused:
                        pickle.dumps(thing)
                    texts.extend(_exception_texts(refused.value))
            with pytest.raises(AuthenticationError) as info:
                FiretitanServiceClient(
                    base_url=trainer.base_url, api_key=WRONG_KEY, config=QUICK_CLIENT
                )
            texts.extend(_exception_texts(info.value))

        await asyncio.to_thread(facade)
        injected = sum(proxy.injected.values())
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts += [formatter.format(record) for record in caplog.records]  # with tracebacks
    texts.append(log_file.read_text())
    assert injected > 0 and any(isinstance(t, str) and "retrying" in t for t in texts)
    for text in texts:
        assert KEY not in text
        assert WRONG_KEY not in text
    figures.record(
        "security: key never shown",
        engine="null",
        texts_checked=len(texts),
        log_records=len(caplog.records),
        faults_injected=injected,
    )


def test_firetitan_serve_never_prints_a_given_key(tmp_path: Path) -> None:
    async def run() -> str:
        args = ("--engine", "null", "--api-key", KEY, "--checkpoint-dir", str(tmp_path))
        async with serve(*args) as child:
            with pytest.raises(AuthenticationError):
                async with connect(child.base_url, WRONG_KEY, QUICK_CLIENT):
                    pass
            child.terminate()
            assert await child.wait() == 0
            return child.output

    output = asyncio.run(run())
    assert "serving at" in output
    assert KEY not in output and WRONG_KEY not in output


# --------------------------------------------------------------------------- TLS, redirects


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 that no trust store knows."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Silent(asyncio.Protocol):
    pass


@pytest.mark.asyncio
async def test_the_client_verifies_tls_by_default(tmp_path: Path, figures: Figures) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    connections = 0

    def accept() -> asyncio.Protocol:
        nonlocal connections
        connections += 1  # called per TCP connection, before the TLS handshake
        return _Silent()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(accept, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        # Positive control: the server does speak TLS, to a client that skips checks.
        unchecked = ssl.create_default_context()
        unchecked.check_hostname = False
        unchecked.verify_mode = ssl.CERT_NONE
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=unchecked)
        writer.close()
        await writer.wait_closed()
        before = connections

        service = connect(
            f"https://127.0.0.1:{port}", KEY, ClientConfig(retry=RetryPolicy(deadline=60.0))
        )
        with pytest.raises(APIConnectionError, match="certificate") as info:
            async with asyncio.timeout(30):
                await service.create_training_client(BASE_MODEL)
        await service.aclose()
        # Refused at the first attempt: a certificate that cannot be trusted is not
        # retried (a default retry policy would otherwise keep at it for a minute).
        assert connections - before == 1
        assert KEY not in "".join(_exception_texts(info.value))
    finally:
        server.close()
        await server.wait_closed()
    figures.record("security: TLS", engine="null", untrusted_certificate_refused=True, attempts=1)


@pytest.mark.asyncio
async def test_redirects_are_not_followed(figures: Figures) -> None:
    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"session_id": "sess-elsewhere"})

    async def start(handler: Any) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, runner.addresses[0][1]

    other, other_port = await start(elsewhere)

    async def redirect(request: web.Request) -> web.Response:
        # 307 keeps the method and body: a client that follows it re-sends everything.
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}{request.path}")

    redirecting, port = await start(redirect)
    try:
        # The session opens (client/config, create_session) on entry: refused there.
        with pytest.raises(APIResponseValidationError, match="redirect"):
            async with connect(f"http://127.0.0.1:{port}", KEY, QUICK_CLIENT) as service:
                await service.create_training_client(BASE_MODEL)
    finally:
        await redirecting.cleanup()
        await other.cleanup()
    assert seen == [], "a request (and the key) went to the redirect target"
    figures.record("security: redirects", engine="null", followed=0)


# --------------------------------------------------------------------------- binding


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _remote, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_firetitan_serve_binds_loopback_unless_told_and_warns_when_told(
    tmp_path: Path, figures: Figures
) -> None:
    async def default_bind() -> tuple[str, set[str]]:
        async with serve("--engine", "null", "--api-key", KEY) as child:
            port = int(child.base_url.rsplit(":", 1)[1])
            return child.base_url, _listening_addresses(port)

    url, addresses = asyncio.run(default_bind())
    assert url.startswith("http://127.0.0.1:")
    if HAS_PROC:
        assert addresses == {"0100007F"}, addresses  # 127.0.0.1, and nothing else
    # Told to bind another interface: it says so. (192.0.2.1 is a documentation
    # address no machine has, so nothing is ever exposed; binding then fails cleanly.)
    told = subprocess.run(
        [
            sys.executable,
            "-m",
            "firetitan.cli",
            "serve",
            "--engine",
            "null",
            "--api-key",
            KEY,
            "--host",
            "192.0.2.1",
            "--checkpoint-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "WARNING: binding 192.0.2.1" in told.stderr
    assert "reachable from other machines" in told.stderr
    assert told.returncode == 2 and "Traceback" not in told.stderr, told.stderr
    assert "cannot start" in told.stderr
    assert KEY not in told.stdout + told.stderr
    # The in-process trainer binds loopback too.
    with LocalTrainer("null") as trainer:
        assert trainer.host == "127.0.0.1" and trainer.base_url.startswith("http://127.0.0.1:")
    figures.record(
        "security: binding", engine="null", default_listen="127.0.0.1 only", warns_otherwise=True
    )

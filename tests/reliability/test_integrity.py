"""Model state is never silently corrupted, and a client cannot make the trainer hold
more than its limits: the nine cases of a careless or hostile user, replayed through the
public SDK and plain HTTP, each recording what it measured.

1. a step that fails changes nothing; 2. invalid Adam values are refused; 3. re-saving a
sampler export's name; 4. a TTL on an export others build on; 5. a seq_id far ahead or
from another session; 6. half-sent request heads; 7. retained results and one request's
samples; 8. links out of the checkpoint root; 9. the API key in the process list.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
import tinker
from shared import BASE_MODEL, FAST_TRAINER, connect

from firetitan import ClientConfig, RequestFailedError
from firetitan.local import LocalTrainer

from .common import HAS_PROC, local_model, serve
from .conftest import Figures, Scale, scales
from .hostile import RawClient

pytestmark = pytest.mark.asyncio
KEY = "tml-integrity-key"
ADAM = tinker.AdamParams(learning_rate=1e-2)
TEXT = b"the quick brown fox jumps over the lazy dog"


def datum(weight: float = 1.0) -> tinker.Datum:
    tokens = list(TEXT)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(tokens[1:], np.int64),
            "weights": np.full(len(tokens) - 1, weight, np.float32),
        },
    )


async def losses(tc: Any, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        fb = await tc.forward_backward([datum()], "cross_entropy")
        await tc.optim_step(ADAM)
        out.append(fb.metrics["loss:sum"])
    return out


@pytest.mark.parametrize("scale", scales(short={"clean_steps": 5}, long={"clean_steps": 40}))
async def test_1_2_a_refused_step_changes_nothing(scale: Scale, figures: Figures) -> None:
    async with (
        LocalTrainer("torch", api_key=KEY, **FAST_TRAINER) as trainer,
        connect(trainer.base_url, KEY, ClientConfig()) as service,
    ):
        # Full-parameter models start from the same weights whatever their seed.
        hit = await service.create_training_client(BASE_MODEL, lora_rank=0, seed=1)
        fresh = await service.create_training_client(BASE_MODEL, lora_rank=0, seed=2)
        refused: dict[str, str] = {}
        try:
            await hit.forward_backward([datum(1e30)], "cross_entropy")
        except RequestFailedError as exc:
            refused["weights=1e30"] = exc.category
        bad_adam = {
            "eps=0": tinker.AdamParams(learning_rate=1e-3, eps=0.0),
            "learning_rate=1e38": tinker.AdamParams(learning_rate=1e38),
        }
        for name, adam in bad_adam.items():
            await hit.forward_backward([datum()], "cross_entropy")
            try:
                await hit.optim_step(adam)
            except RequestFailedError as exc:
                refused[name] = exc.category
            await hit.forward_backward([datum(-1.0)], "cross_entropy")  # undo the gradient
        # The refused requests left gradients that sum to zero: compare with a model
        # that saw none of them by its next losses and steps.
        await hit.optim_step(tinker.AdamParams(learning_rate=0.0))
        await fresh.optim_step(tinker.AdamParams(learning_rate=0.0))
        hit_losses = await losses(hit, scale.clean_steps)
        fresh_losses = await losses(fresh, scale.clean_steps)
        assert refused == {k: "user" for k in ("weights=1e30", *bad_adam)}
        assert hit_losses == fresh_losses
        assert hit_losses[-1] < hit_losses[0]
        figures.record(
            f"integrity: refused steps change nothing ({scale.name})",
            engine="torch",
            refused=sorted(refused),
            clean_steps_after=scale.clean_steps,
            loss_first=hit_losses[0],
            loss_last=hit_losses[-1],
            identical_to_untouched_model=hit_losses == fresh_losses,
        )


@pytest.mark.parametrize("scale", scales(short={"saves": 3}, long={"saves": 20}))
async def test_3_4_exports_survive_names_and_ttls(
    scale: Scale, figures: Figures, tmp_path: Path
) -> None:
    async with (
        LocalTrainer("torch", api_key=KEY, checkpoint_dir=tmp_path, **FAST_TRAINER) as trainer,
        connect(trainer.base_url, KEY, ClientConfig()) as service,
    ):
        tc = await service.create_training_client(BASE_MODEL, lora_rank=0)
        params = tinker.SamplingParams(max_tokens=2, seed=1)
        prompt = tinker.ModelInput.from_ints(list(b"the"))
        loadable = 0
        for _ in range(scale.saves):  # "latest" every few steps, as RL loops do
            await losses(tc, 1)
            saved = await tc.save_weights_for_sampler_ext("latest", checkpoint_type="delta")
            sampler = await service.create_sampling_client(model_path=saved.path)
            loadable += bool((await sampler.sample(prompt, 1, params)).sequences)
        base = await tc.save_weights_for_sampler_ext("scratch", ttl_seconds=1)
        keep = await tc.save_weights_for_sampler_ext("keep", checkpoint_type="delta")
        swept = tmp_path / trainer.job_id / "sampler"
        short = await tc.save_weights_for_sampler_ext("short", ttl_seconds=1)
        for _ in range(200):
            if not (swept / short.snapshot_name).exists():
                break
            await asyncio.sleep(0.05)
        sampler = await service.create_sampling_client(model_path=keep.path)
        keep_loads = bool((await sampler.sample(prompt, 1, params)).sequences)
        assert loadable == scale.saves and keep_loads
        assert (swept / base.snapshot_name).is_dir()
        assert not (swept / short.snapshot_name).exists()
        figures.record(
            f"integrity: exports survive names and TTLs ({scale.name})",
            engine="torch",
            saves_under_one_name=scale.saves,
            loadable_after_each=loadable,
            expired_base_kept_for_live_delta=True,
            expired_export_nothing_needs_swept=True,
        )


@pytest.mark.parametrize("scale", scales(short={"steps": 5}, long={"steps": 50}))
async def test_5_a_far_seq_id_or_another_session_cannot_brick_a_model(
    scale: Scale, figures: Figures, request: pytest.FixtureRequest
) -> None:
    async with (
        LocalTrainer("null", api_key=KEY, **FAST_TRAINER) as trainer,
        local_model(trainer, ClientConfig(), lora_rank=0) as tc,
    ):
        api = RawClient(trainer.base_url, KEY)
        request.addfinalizer(api.close)
        adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
        body = {"model_id": tc.model_id, "seq_id": 10**15, "adam_params": adam}
        far = await asyncio.to_thread(api.post, "optim_step", body)
        session = await asyncio.to_thread(api.post, "create_session", {"sdk_version": "0.23.0"})
        foreign = await asyncio.to_thread(
            api.request,
            "POST",
            "/api/v1/optim_step",
            json.dumps({**body, "seq_id": 1}).encode(),
            {"X-Firetitan-Session-Id": session.json["session_id"]},
        )
        after = await losses(tc, scale.steps)
        assert (far.status, foreign.status) == (422, 403)
        assert len(after) == scale.steps
        figures.record(
            f"integrity: seq_id bound and session ownership ({scale.name})",
            engine="null",
            seq_id_10e15=far.status,
            other_session=foreign.status,
            client_steps_after=len(after),
        )


@pytest.mark.parametrize("scale", scales(short={"sockets": 300}, long={"sockets": 1100}))
async def test_6_half_sent_heads_are_timed_out_and_capped(
    scale: Scale, figures: Figures, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    limits = {"head_timeout_seconds": 2.0, "max_connections": 256}
    async with LocalTrainer("null", api_key=KEY, **FAST_TRAINER, **limits) as trainer:
        url = urlsplit(trainer.base_url)
        assert url.hostname is not None and url.port is not None
        writers = []
        for _ in range(scale.sockets):
            _reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(b"POST /api/v1/healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            writers.append(writer)
        guard = trainer.server._guard
        peak = guard.open_connections
        start = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                if not guard.open_connections:
                    break
                await asyncio.sleep(0.1)
            reaped_s = time.monotonic() - start
            async with http.get(
                f"{trainer.base_url}/api/v1/healthz", headers={"X-API-Key": KEY}
            ) as resp:
                healthy = resp.status == 200
        for writer in writers:
            writer.close()
        tracebacks = sum(1 for r in caplog.records if r.exc_info)
        assert peak <= 256 and guard.open_connections == 0 and healthy and tracebacks == 0
        figures.record(
            f"integrity: half-sent heads ({scale.name})",
            engine="null",
            sockets=scale.sockets,
            max_connections=256,
            peak_open=peak,
            refused_over_cap=guard.refused_total,
            all_closed_within_s=reaped_s,
            head_timeout_s=2.0,
            healthz_after=healthy,
            tracebacks_logged=tracebacks,
            log_lines=len(caplog.records),
        )


@pytest.mark.parametrize("scale", scales(short={"forwards": 12}, long={"forwards": 40}))
async def test_7_retained_results_and_one_request_are_bounded(
    scale: Scale, figures: Figures, request: pytest.FixtureRequest
) -> None:
    cap = 4 * 1024 * 1024
    async with LocalTrainer(
        "null", api_key=KEY, max_retained_result_bytes=cap, **FAST_TRAINER
    ) as trainer:
        api = RawClient(trainer.base_url, KEY)
        request.addfinalizer(api.close)

        async def result(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
            request_id = await asyncio.to_thread(api.submit, endpoint, body)
            return await asyncio.to_thread(api.result, request_id)

        session = await asyncio.to_thread(api.post, "create_session", {"sdk_version": "0.23.0"})
        create = {
            "session_id": session.json["session_id"],
            "model_seq_id": 0,
            "base_model": BASE_MODEL,
        }
        model = (await result("create_model", create))["model_id"]
        tokens = list(range(1, 251)) * 16  # 4,000 tokens
        targets = {"data": tokens, "dtype": "int64", "shape": [len(tokens)]}
        data = [
            {
                "model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
                "loss_fn_inputs": {"target_tokens": targets},
            }
        ] * 8
        executor = trainer.server._executor
        peak = 0
        for seq in range(1, scale.forwards + 1):
            forward = {"data": data, "loss_fn": "cross_entropy"}
            await result("forward", {"model_id": model, "seq_id": seq, "forward_input": forward})
            peak = max(peak, executor._retained_bytes)
        one_result = executor._jobs[next(reversed(executor._finished))].nbytes
        sample = {
            "base_model": BASE_MODEL,
            "num_samples": 65_536,
            "prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 1},
        }
        refused = (await asyncio.to_thread(api.post, "asample", sample)).status
        assert peak <= max(cap, one_result) and refused == 422
        figures.record(
            f"integrity: memory bounds ({scale.name})",
            engine="null",
            forwards=scale.forwards,
            result_mib=one_result / 2**20,
            retained_cap_mib=cap / 2**20,
            retained_peak_mib=peak / 2**20,
            unbounded_would_be_mib=scale.forwards * one_result / 2**20,
            num_samples_65536=refused,
        )


@pytest.mark.parametrize("scale", scales(short={}, long={}))
async def test_8_links_out_of_the_root_are_not_followed(
    scale: Scale, figures: Figures, tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    async with (
        LocalTrainer("null", api_key=KEY, checkpoint_dir=outside, job_id="victim") as other,
        local_model(other, ClientConfig(), lora_rank=0) as tc,
    ):
        await tc.save_state("secret")
    (root / "job").mkdir(parents=True)
    (root / "victim").symlink_to(outside / "victim", target_is_directory=True)
    (root / "job" / "state").mkdir()
    (root / "job" / "state" / "secret").symlink_to(outside / "victim" / "state" / "secret")
    async with (
        LocalTrainer("null", api_key=KEY, checkpoint_dir=root, job_id="job") as trainer,
        local_model(trainer, ClientConfig(), lora_rank=0) as tc,
    ):
        listed = await tc.list_checkpoints()
        loaded = 0
        for path in ("secret", "cross_job://victim/secret"):
            try:
                await tc.load_state(path)
                loaded += 1
            except RequestFailedError:
                pass
        assert listed == [] and loaded == 0
        figures.record(
            f"integrity: links out of the checkpoint root ({scale.name})",
            engine="null",
            linked_job_and_name=2,
            listed=len(listed),
            loaded=loaded,
        )


@pytest.mark.skipif(not HAS_PROC, reason="reads the process list from /proc")
@pytest.mark.parametrize("scale", scales(short={}, long={}))
async def test_9_the_documented_serve_keeps_the_key_out_of_the_process_list(
    scale: Scale, figures: Figures, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    seen = {}
    for form, args, env in [
        ("--api-key-file", ("--api-key-file", str(key_file)), {}),
        ("FIRETITAN_API_KEY", (), {"FIRETITAN_API_KEY": KEY}),
    ]:
        async with serve("--engine", "null", *args, env=env) as child:
            ps = await asyncio.to_thread(
                subprocess.run, ["ps", "-eo", "args"], capture_output=True, text=True
            )
            cmdline = await asyncio.to_thread(Path(f"/proc/{child.pid}/cmdline").read_bytes)
            seen[form] = KEY in ps.stdout or KEY.encode() in cmdline
    assert not any(seen.values())
    figures.record(
        f"integrity: API key and the process list ({scale.name})",
        engine="null",
        forms=sorted(seen),
        key_visible_in_ps=any(seen.values()),
    )

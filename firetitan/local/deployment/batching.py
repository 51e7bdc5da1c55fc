"""Continuous batching: concurrent completions share forward passes.

Every running sequence keeps its own rows of one shared KV cache. Each turn of the
worker thread:

1. admits waiting requests: prefills them (requests with equally long prompts in one
   forward pass) and joins their caches to the batch, left-padded to a common length;
2. picks the next token of every sequence from its last logits (each with its own
   temperature, top-k, top-p, seed and stops) and hands it to the request's listener;
3. drops finished and cancelled sequences from the batch;
4. runs one decode step over all remaining sequences, (B, 1) tokens, each at its own
   position, with an attention mask that hides the padding.

New requests therefore join between decode steps instead of waiting for the batch to
drain. Padding is zero-filled and masked, so every sequence computes what it would
compute alone (up to float rounding): the tests compare batched against unbatched.

Weights: a request runs on the snapshot that was served when it was submitted. A hot-
load changes the snapshot for new requests only; sequences already running form a
*cohort* per snapshot, and each cohort steps until it drains, so requests in flight
during a hot-load finish on the weights they started with.

The KV cache is the model's own ``DynamicCache``; joins and drops edit its per-layer
``keys``/``values`` tensors (transformers' cache layer API).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from firetitan.local.deployment.snapshots import Snapshot
from firetitan.local.torch.models import cache_keyword
from firetitan.local.torch.sampling import (
    SamplingPlan,
    cache_of,
    has_stop,
    sampling_logits,
    stop_window,
)
from firetitan.local.torch.tokenizer import Tokenizer

__all__ = ["Batcher", "Finish", "Generation", "PromptRows", "Token"]

log = logging.getLogger("firetitan.local.deployment")

TopLogprobs = list[tuple[int, float]]


@attrs.frozen
class Token:
    """One generated token: the model's raw log-probability of it, and its log-probability
    under the distribution it was sampled from (temperature, top-k, top-p applied)."""

    token_id: int
    logprob: float
    sampling_logprob: float
    top: TopLogprobs | None


@attrs.frozen
class PromptRows:
    """Log-probabilities of the prompt tokens (``nan`` for the first one)."""

    logprobs: list[float]
    top: list[TopLogprobs] | None


@attrs.frozen
class Finish:
    """The end of a generation: ``reason`` is ``"stop"``, ``"length"`` or ``"error"``
    (then ``message`` says what failed)."""

    reason: str
    queue_seconds: float
    first_token_seconds: float | None
    message: str = ""


Event = Token | PromptRows | Finish


@attrs.define(eq=False)
class Generation:
    """One completion request, as the batcher runs it.

    ``listener`` receives its events on the worker thread, in order; it must not block.
    """

    prompt: list[int]
    plan: SamplingPlan
    generator: torch.Generator | None  # None: the batcher's shared one
    top_logprobs: int
    echo: bool
    listener: Callable[[Event], None]
    snapshot: Snapshot | None = None
    submitted: float = attrs.field(factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    tokens: list[int] = attrs.field(factory=list)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (read by the worker at its next turn)."""
        self.cancelled = True


class _Cohort:
    """The running sequences of one snapshot and their shared KV cache."""

    def __init__(self, snapshot: Snapshot, batcher: Batcher) -> None:
        self.snapshot = snapshot
        self.module: nn.Module = snapshot.module
        self._b = batcher
        self._keyword = cache_keyword(self.module)
        self.rows: list[Generation] = []
        self.cache: Any = None  # DynamicCache over all rows
        self.mask: torch.Tensor | None = None  # (B, L) bool: True where a row has a token
        self.positions: torch.Tensor | None = None  # (B,) the next position of each row
        self.logits: torch.Tensor | None = None  # (B, V) float32 next-token logits

    # ------------------------------------------------------------------ join

    def admit(self, newcomers: list[Generation]) -> None:
        """Prefill ``newcomers`` (equal prompt lengths together) and join the batch."""
        by_length: dict[int, list[Generation]] = {}
        for gen in newcomers:
            by_length.setdefault(len(gen.prompt), []).append(gen)
        for group in by_length.values():
            self._join(group, *self._prefill(group))

    def _prefill(self, group: list[Generation]) -> tuple[Any, torch.Tensor]:
        device = self._b.device
        now = time.monotonic()
        for gen in group:
            gen.started = now
        ids = torch.tensor([g.prompt for g in group], dtype=torch.int64, device=device)
        out = self.module(input_ids=ids, use_cache=True)
        logits = out.logits.float()
        for i, gen in enumerate(group):
            if gen.echo:
                gen.listener(self._b.prompt_rows(logits[i], ids[i], gen.top_logprobs))
        return cache_of(out), logits[:, -1, :]

    def _join(self, group: list[Generation], cache: Any, last_logits: torch.Tensor) -> None:
        length = len(group[0].prompt)
        device = self._b.device
        new_mask = torch.ones(len(group), length, dtype=torch.bool, device=device)
        new_pos = torch.full((len(group),), length, dtype=torch.int64, device=device)
        if not self.rows:
            self.rows, self.cache = list(group), cache
            self.mask, self.positions, self.logits = new_mask, new_pos, last_logits
            return
        assert self.mask is not None and self.positions is not None and self.logits is not None
        width = max(self.mask.shape[1], length)
        old_pad, new_pad = width - self.mask.shape[1], width - length
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                merged = torch.cat(
                    [
                        _left_pad(getattr(old_layer, attr), old_pad),
                        _left_pad(getattr(new_layer, attr), new_pad),
                    ],
                    dim=0,
                )
                setattr(old_layer, attr, merged)
        self.mask = torch.cat(
            [_left_pad_mask(self.mask, old_pad), _left_pad_mask(new_mask, new_pad)]
        )
        self.positions = torch.cat([self.positions, new_pos])
        self.logits = torch.cat([self.logits, last_logits])
        self.rows.extend(group)

    # ------------------------------------------------------------------ step

    def step(self) -> None:
        """Choose each row's next token, drop finished rows, decode one step."""
        if not self.rows:
            return
        assert self.logits is not None
        chosen = self._b.choose(self.rows, self.logits)
        keep = [i for i, gen in enumerate(self.rows) if not self._advance(gen, chosen[i])]
        self._select(keep)
        if not self.rows:
            return
        assert self.mask is not None and self.positions is not None
        device = self._b.device
        tokens = torch.tensor([g.tokens[-1] for g in self.rows], dtype=torch.int64, device=device)
        self.mask = torch.cat(
            [self.mask, torch.ones(len(self.rows), 1, dtype=torch.bool, device=device)], dim=1
        )
        out = self.module(
            input_ids=tokens[:, None],
            attention_mask=self.mask.long(),
            position_ids=self.positions[:, None],
            use_cache=True,
            **{self._keyword: self.cache},
        )
        self.cache = cache_of(out)
        self.positions = self.positions + 1
        self.logits = out.logits[:, -1, :].float()

    def _advance(self, gen: Generation, token: Token | None) -> bool:
        """Record ``token`` for ``gen``; whether ``gen`` is finished."""
        if gen.cancelled:
            return True
        if len(gen.tokens) >= gen.plan.max_new:
            token = None
        if token is not None:
            if gen.first_token is None:
                gen.first_token = time.monotonic()
            gen.tokens.append(token.token_id)
            gen.listener(token)
        plan = gen.plan
        reason = None
        if token is None:  # max_tokens 0: nothing to generate
            reason = "length"
        elif token.token_id in plan.stop_ids or (
            plan.stop_strings
            and has_stop(
                self._b.tokenizer.decode(gen.tokens[-stop_window(plan) :]), plan.stop_strings
            )
        ):
            reason = "stop"
        elif len(gen.tokens) >= plan.max_new:
            reason = "length"
        if reason is None:
            return False
        self._b.finish(gen, reason)
        return True

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache = [], None
            self.mask = self.positions = self.logits = None
            return
        assert self.mask is not None and self.positions is not None and self.logits is not None
        index = torch.tensor(keep, dtype=torch.int64, device=self._b.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row carry nothing: trim them.
        first = int(mask.any(dim=0).long().argmax())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def fail(self, message: str) -> None:
        for gen in self.rows:
            self._b.finish(gen, "error", message)
        self._select([])


class Batcher:
    """The worker thread that runs every generation.

    Args:
        tokenizer: Decodes generated tokens for stop strings.
        device: Where the models run.
        max_batch: Most sequences decoded together per snapshot; more wait their turn.
        seed: Seeds the generator of requests that give no seed.
    """

    def __init__(
        self, tokenizer: Tokenizer, device: torch.device, *, max_batch: int = 256, seed: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max_batch
        self._rng = torch.Generator(device="cpu")
        self._rng.manual_seed(seed)
        self._cond = threading.Condition()
        self._waiting: list[Generation] = []
        self._cohorts: dict[int, _Cohort] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="firetitan-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail what is still running or waiting, and end the worker."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def load(self) -> int:
        """Sequences waiting or running."""
        with self._cond:
            return len(self._waiting) + sum(len(c.rows) for c in self._cohorts.values())

    def submit(self, gen: Generation, snapshot: Snapshot) -> None:
        """Queue ``gen`` to run on ``snapshot``."""
        gen.snapshot = snapshot
        with self._cond:
            if self._stopped:
                raise RuntimeError("the deployment is shutting down")
            self._waiting.append(gen)
            self._cond.notify()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._busy():
                    self._cond.wait()
                if self._stopped:
                    leftovers = self._waiting + [g for c in self._cohorts.values() for g in c.rows]
                    self._waiting = []
                    self._cohorts = {}
                    break
                admitted = self._take_waiting()
            self._turn(admitted)
        for gen in leftovers:
            self.finish(gen, "error", "the deployment is shutting down")

    def _busy(self) -> bool:
        return any(c.rows for c in self._cohorts.values())

    def _take_waiting(self) -> list[Generation]:
        """Waiting requests that fit their cohort's batch, in arrival order."""
        admitted, rest = [], []
        room: dict[int, int] = {}
        for gen in self._waiting:
            assert gen.snapshot is not None
            key = id(gen.snapshot)
            cohort = self._cohorts.get(key)
            free = room.setdefault(key, self.max_batch - (len(cohort.rows) if cohort else 0))
            if gen.cancelled:
                self.finish(gen, "error", "cancelled")
            elif free > 0:
                admitted.append(gen)
                room[key] = free - 1
            else:
                rest.append(gen)
        self._waiting = rest
        for gen in admitted:
            assert gen.snapshot is not None
            if id(gen.snapshot) not in self._cohorts:
                self._cohorts[id(gen.snapshot)] = _Cohort(gen.snapshot, self)
        return admitted

    def _turn(self, admitted: list[Generation]) -> None:
        with torch.inference_mode():
            for key, cohort in list(self._cohorts.items()):
                newcomers = [g for g in admitted if id(g.snapshot) == key]
                try:
                    if newcomers:
                        cohort.admit(newcomers)
                    cohort.step()
                except Exception as exc:  # a failed forward ends its cohort, not the worker
                    log.exception("generation failed")
                    for gen in newcomers:
                        if gen not in cohort.rows:
                            self.finish(gen, "error", f"generation failed: {type(exc).__name__}")
                    cohort.fail(f"generation failed: {type(exc).__name__}: {exc}")
                if not cohort.rows:
                    with self._cond:
                        del self._cohorts[key]

    # ------------------------------------------------------------------ per token

    def choose(self, rows: Sequence[Generation], logits: torch.Tensor) -> list[Token | None]:
        """The next token of every row (None for cancelled rows)."""
        raw = torch.log_softmax(logits, dim=-1)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, gen in enumerate(rows):
            if not gen.cancelled:
                p = gen.plan
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        out: list[Token | None] = [None] * len(rows)
        for (temperature, _, _), members in groups.items():
            index = torch.tensor(members, dtype=torch.int64, device=logits.device)
            if temperature == 0:
                picks = raw.index_select(0, index).argmax(dim=-1).tolist()
                sampled = [0.0] * len(members)  # greedy: the pick has probability 1
            else:
                plan = rows[members[0]].plan
                dist = torch.log_softmax(sampling_logits(logits.index_select(0, index), plan), -1)
                picks = self._draw(dist.exp().cpu(), [rows[i].generator for i in members])
                sampled = dist.cpu()[torch.arange(len(members)), picks].tolist()
            lps = raw.index_select(0, index).cpu()[torch.arange(len(members)), picks].tolist()
            for j, i in enumerate(members):
                k = rows[i].top_logprobs
                top = _top(raw[i], k) if k > 0 else None
                out[i] = Token(picks[j], lps[j], sampled[j], top)
        return out

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
        """One token per row of ``probs``: rows of seeded requests from their own
        generator, all the others in one draw from the shared one."""
        picks = [0] * len(generators)
        shared = [j for j, g in enumerate(generators) if g is None]
        if shared:
            index = torch.tensor(shared, dtype=torch.int64)
            drawn = torch.multinomial(probs.index_select(0, index), 1, generator=self._rng)
            for j, tok in zip(shared, drawn.squeeze(-1).tolist(), strict=True):
                picks[j] = tok
        for j, generator in enumerate(generators):
            if generator is not None:
                picks[j] = int(torch.multinomial(probs[j], 1, generator=generator))
        return picks

    def prompt_rows(self, logits: torch.Tensor, ids: torch.Tensor, k: int) -> PromptRows:
        """Prompt log-probabilities from a prefill's (P, V) logits."""
        raw = torch.log_softmax(logits, dim=-1)
        picked = raw[:-1].gather(-1, ids[1:, None]).squeeze(-1).tolist()
        top: list[TopLogprobs] | None = None
        if k > 0:
            top = [[], *(_top(raw[j], k) for j in range(raw.shape[0] - 1))]
        return PromptRows([math.nan, *picked], top)

    def finish(self, gen: Generation, reason: str, message: str = "") -> None:
        now = time.monotonic()
        started = gen.started if gen.started is not None else now
        first = None if gen.first_token is None else gen.first_token - gen.submitted
        gen.listener(Finish(reason, started - gen.submitted, first, message))


def _top(row: torch.Tensor, k: int) -> TopLogprobs:
    values, ids = torch.topk(row, min(k, row.shape[-1]))
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, L, D) cache tensor with ``n`` zero positions in front."""
    if n == 0:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)

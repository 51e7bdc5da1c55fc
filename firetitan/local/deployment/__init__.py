"""A local inference deployment: the rollout half of an RL loop, the Fireworks way.

``firetitan deploy`` (or `LocalDeployment`, which runs it as a child process) serves
what a client needs of an existing Fireworks deployment (spec/deployment.md): account
and deployment lookup, hot-load of the sampler snapshots a local trainer exports under
the same checkpoint root, and completions sampling with continuous batching.

Modules: `snapshots` (which weights, base and arc_v2 deltas), `batching` (the decode
loop shared by concurrent requests), `completions` (request and response bodies),
`server` (routes, auth, hot-load states), `launcher` (the child process).
"""

from __future__ import annotations

from firetitan.local.deployment.launcher import LocalDeployment

__all__ = ["LocalDeployment"]

"""Project tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``bench``, ``reliability``, ``demo``.

Every session installs ``torch==2.13.0`` before the project so that the resolver keeps
that CPU build instead of pulling a multi-gigabyte CUDA one.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
COOKBOOK = "tinker-cookbook==0.6.1"


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite as CI runs it (the long reliability checks are left out)."""
    _install(session, "local,test")
    # tinker-cookbook pins tml-renderers>=0.4.1, which the index lacks and the tested
    # loops never import: the cookbook goes in without its pins, its other requirements
    # come from the test extra.
    session.install("--no-deps", COOKBOOK)
    session.run("python", "-m", "pytest", "-m", "not slow and not reliability", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff, and a check that the generated sync facade is up to date."""
    _install(session, "dev")
    session.run("ruff", "check", "firetitan", "tests", "benchmarks", "scripts", "examples")
    session.run("python", "scripts/gen_sync.py", "--check")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy strict on the package."""
    _install(session, "dev")
    session.run("mypy", "firetitan")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The side-by-side benchmarks; writes benchmarks/RESULTS.md."""
    _install(session, "local,test")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python="3.11")
def reliability(session: nox.Session) -> None:
    """The long reliability suite: faults, crashes, fuzzing, load."""
    _install(session, "local,test")
    session.run("python", "-m", "pytest", "-m", "reliability", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """The demo on the embedded trainer."""
    _install(session, "local")
    session.run("firetitan", "demo", *session.posargs)

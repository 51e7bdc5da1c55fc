"""P10: every public async method has a facade twin with the same signature and docstring.

Docstrings are the async ones with the generator's rewrite table (`DOC_REWRITES`)
applied, and then speak of the sync surface only: no `aclose`, no async context
manager, no event loop. A class whose async constructor takes an internal type has no
public facade constructor.

The expected facade signature is derived here independently of the generator: parameter
names, kinds and defaults are identical; annotations differ only by the documented
rewrites (`AsyncAPIFuture` -> `APIFuture`, `AsyncX` -> `X`, awaitables unwrapped), and
`aclose`/`__aenter__`/`__aexit__` become `close`/`__enter__`/`__exit__`.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from types import ModuleType
from typing import Any

import pytest

import firetitan
import firetitan._async.sampling
import firetitan._async.service
import firetitan._async.training
import firetitan._sync
from firetitan._read_only import ReadOnly

from .conftest import GEN_SYNC

RENAMES = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


def _doc_rewrites() -> list[tuple[str, str]]:
    spec = importlib.util.spec_from_file_location("gen_sync_rules", GEN_SYNC)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_sync_rules"] = module
    spec.loader.exec_module(module)
    return list(module.DOC_REWRITES)


DOC_REWRITES = _doc_rewrites()
ASYNC_WORDING = re.compile(r"\baclose\b|async context manager|event loop|\bawait\b|`Async")


def sync_doc(doc: str | None, rewrite_docs: bool) -> str | None:
    """The docstring the facade should carry for an async docstring."""
    if doc is None or not rewrite_docs:
        return doc
    for pattern, replacement in DOC_REWRITES:
        doc = re.sub(pattern, replacement, doc)
    return doc


KEPT = {"__init__", "__aenter__", "__aexit__"}
FACADE_KEPT = {"__init__", "__enter__", "__exit__"}


def facade_classes(package: ModuleType) -> list[type]:
    return [getattr(package, name) for name in package.__all__]


def async_twin(facade: type) -> type:
    module = inspect.getmodule(facade)
    assert module is not None
    source_module = __import__(
        module.__name__.replace("._sync.", "._async.").replace(
            "toykit_sync.", "facade.toykit._async."
        ),
        fromlist=["*"],
    )
    twin: type = getattr(source_module, f"Async{facade.__name__}")
    return twin


def rewrite(annotation: str, twins: set[str]) -> str:
    text = annotation.replace("AsyncAPIFuture", "APIFuture")
    for name in twins:
        text = re.sub(rf"\b{name}\b", name.removeprefix("Async"), text)
    match = re.fullmatch(r"(?:Awaitable|Coroutine)\[(?:[^,]+, [^,]+, )?(.*)\]", text)
    return match.group(1) if match else text


def public_members(cls: type, kept: set[str]) -> dict[str, Any]:
    """Methods, properties and static methods, without private names (but `kept`)."""
    return {
        name: member
        for name, member in vars(cls).items()
        if (not name.startswith("_") or name in kept)
        and (callable(member) or isinstance(member, property | staticmethod | ReadOnly))
    }


def check_class(facade: type, twins: set[str], *, rewrite_docs: bool = False) -> None:
    source = async_twin(facade)

    def doc_of(obj: Any) -> str | None:
        return sync_doc(inspect.getdoc(obj), rewrite_docs)

    assert inspect.getdoc(facade) == doc_of(source)
    expected = {RENAMES.get(n, n): (n, m) for n, m in public_members(source, KEPT).items()}
    actual = public_members(facade, FACADE_KEPT)
    extra = set(actual) - set(expected)
    assert not extra, f"{facade.__name__} has members without an async twin: {extra}"
    for name, (async_name, member) in expected.items():
        assert name in actual, f"{facade.__name__}.{name} is missing"
        twin = actual[name]
        where = f"{facade.__name__}.{name}"
        if isinstance(member, property | ReadOnly):
            # A `ReadOnly` attribute (its type in the class annotation) becomes a property.
            assert isinstance(twin, property), where
            assert inspect.getdoc(twin) == doc_of(member), where
            assert twin.fget is not None
            if isinstance(member, ReadOnly):
                declared = re.fullmatch(r"ReadOnly\[(.*)\]", source.__annotations__[name])
                assert declared is not None, where
                a_ret = declared.group(1)
            else:
                assert member.fget is not None
                a_ret = inspect.signature(member.fget).return_annotation
            assert inspect.signature(twin.fget).return_annotation == rewrite(a_ret, twins), where
            continue
        if isinstance(member, staticmethod):
            assert isinstance(twin, staticmethod), where
            member, twin = member.__func__, twin.__func__
        if name == "__init__" and "Transport" in str(inspect.signature(member)):
            # Made by factory methods only: no public constructor, no internal types.
            assert str(inspect.signature(twin)) == "(self) -> 'None'", where
            with pytest.raises(TypeError, match="no public constructor"):
                facade()
            continue
        assert inspect.getdoc(twin) == doc_of(member), where
        assert not inspect.iscoroutinefunction(twin), f"{where} must block, not be a coroutine"
        a_sig, f_sig = inspect.signature(member), inspect.signature(twin)
        a_params, f_params = list(a_sig.parameters.values()), list(f_sig.parameters.values())
        assert [p.name for p in f_params] == [p.name for p in a_params], where
        assert [p.kind for p in f_params] == [p.kind for p in a_params], where
        for a, f in zip(a_params, f_params, strict=True):
            assert f.default is a.default or f.default == a.default, f"{where}({a.name})"
            if a.annotation is not inspect.Parameter.empty:
                assert f.annotation == rewrite(a.annotation, twins), f"{where}({a.name})"
        if async_name == "__aenter__":
            assert f_sig.return_annotation == "Self", where
        elif async_name != "__init__":
            assert f_sig.return_annotation == rewrite(a_sig.return_annotation, twins), where


def test_the_firetitan_facade_mirrors_the_async_core() -> None:
    classes = facade_classes(firetitan._sync)
    # Every async client of the public API has its public facade twin (the async
    # future's twin, APIFuture, is not generated).
    clients = {n for n in firetitan.__all__ if n.startswith("Async") and n != "AsyncAPIFuture"}
    assert len(clients) == 7
    assert {f"Async{c.__name__}" for c in classes} == clients
    assert {c.__name__ for c in classes} <= set(firetitan.__all__)
    twins = {f"Async{c.__name__}" for c in classes}
    for cls in classes:
        check_class(cls, twins, rewrite_docs=True)


def test_facade_docstrings_speak_sync() -> None:
    for cls in facade_classes(firetitan._sync):
        docs = {cls.__name__: inspect.getdoc(cls)}
        for name, member in vars(cls).items():
            target = member.fget if isinstance(member, property) else member
            if callable(target) and not name.startswith("_"):
                docs[f"{cls.__name__}.{name}"] = inspect.getdoc(target)
        for where, doc in docs.items():
            assert not ASYNC_WORDING.search(doc or ""), f"{where}: {doc}"


def test_the_toy_facade_mirrors_the_toy_core(toy: ModuleType) -> None:
    classes = facade_classes(toy)
    twins = {f"Async{c.__name__}" for c in classes}
    for cls in classes:
        check_class(cls, twins)


@pytest.mark.parametrize(
    "name",
    [
        "FiretitanServiceClient",
        "FiretitanTrainingClient",
        "SamplingClient",
        "APIFuture",
        "Deployment",
        "DeploymentSampler",
        "RestClient",
        "WeightSyncer",
    ],
)
def test_the_facade_is_exported(name: str) -> None:
    assert name in firetitan.__all__
    assert getattr(firetitan, name).__module__.startswith(
        ("firetitan._sync.", "firetitan._blocking_future")
    )

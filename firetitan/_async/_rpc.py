"""`rpc`: an RPC method in two phases, the call and the start.

An RPC method (``forward``, ``optim_step``, ``sample``, ...) returns its future at once.
Its work splits in two:

1. *the call*: check the arguments and compute what needs no loop state. This may run
   on any thread, so it only reads the client (``_check_open``, configuration);
2. *the start*: submit the request on the client's event loop and return the
   `AsyncAPIFuture`.

The method is written once, as a plain method that does phase 1 and returns phase 2 as
a `Start`, a function of no arguments::

    @rpc
    def optim_step(self, adam_params, ...) -> Start[tinker.OptimStepResponse]:
        check(adam_params)
        request = ...
        return lambda: self._simple_call(endpoints.OPTIM_STEP, request, deadline)

Called on the async core, ``client.optim_step(...)`` runs both phases and returns the
`AsyncAPIFuture`; that is also what its signature says (`rpc.__signature__`). The
blocking facade calls ``client.optim_step.prepare(...)`` on the caller's thread, so an
argument error raises there exactly as on the async core, and hands the `Start` to its
portal's loop (`firetitan._portal.Portal.start`). The signature, the checks and the
docstring therefore have one home, the method.

RPC methods that are one operation with a different first argument (``forward`` and
``forward_backward``: the same arguments, another endpoint) share one implementation,
as `property` shares a getter: ``forward = rpc.partial(_pass, endpoints.FORWARD,
doc=...)`` is the RPC method `_pass` with its first argument given.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar, overload

from firetitan._async.async_future import AsyncAPIFuture

__all__ = ["BoundRPC", "Start", "rpc"]

S = TypeVar("S")
A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")

#: Phase 2 of an RPC method: run on the client's loop, it submits and returns the future.
Start: TypeAlias = Callable[[], AsyncAPIFuture[R]]


class rpc(Generic[S, P, R]):
    """Make a method returning a `Start` into an RPC method (see the module docstring)."""

    def __init__(self, prepare: Callable[Concatenate[S, P], Start[R]]) -> None:
        self._prepare = prepare
        functools.update_wrapper(self, prepare)
        # Tools (help, the facade's parity test) see what a caller gets back.
        sig = inspect.signature(prepare)
        self.__signature__ = sig.replace(return_annotation=_future_of(sig.return_annotation))

    @classmethod
    def partial(
        cls, prepare: Callable[Concatenate[S, A, P], Start[R]], first: A, *, doc: str
    ) -> rpc[S, P, R]:
        """The RPC method `prepare` with its first argument (after self) given."""

        def bound(obj: S, /, *args: P.args, **kwargs: P.kwargs) -> Start[R]:
            return prepare(obj, first, *args, **kwargs)

        sig = inspect.signature(prepare)
        params = list(sig.parameters.values())
        bound.__signature__ = sig.replace(parameters=[params[0], *params[2:]])  # type: ignore[attr-defined]
        bound.__doc__ = doc
        return cls(bound)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        # A `partial` learns its name from the class body, like a function's own.
        self.__name__ = name
        self.__qualname__ = f"{owner.__qualname__}.{name}"

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> rpc[S, P, R]: ...

    @overload
    def __get__(self, obj: S, owner: type[Any] | None = None) -> BoundRPC[P, R]: ...

    def __get__(self, obj: S | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        return BoundRPC(self, obj)

    def __call__(self, obj: S, /, *args: P.args, **kwargs: P.kwargs) -> AsyncAPIFuture[R]:
        """Call through the class (``Client.forward(client, ...)``), as with a function."""
        return self._prepare(obj, *args, **kwargs)()


class BoundRPC(Generic[P, R]):
    """An RPC method of one client: call it, or `prepare` a call for another thread."""

    __slots__ = ("_method", "_obj")

    def __init__(self, method: rpc[Any, P, R], obj: object) -> None:
        self._method = method
        self._obj = obj

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> AsyncAPIFuture[R]:
        return self._method._prepare(self._obj, *args, **kwargs)()

    def prepare(self, *args: P.args, **kwargs: P.kwargs) -> Start[R]:
        """Phase 1 on this thread: check the arguments; return the start for the loop."""
        return self._method._prepare(self._obj, *args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._method.__doc__

    @property
    def __signature__(self) -> inspect.Signature:
        sig = self._method.__signature__
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self) -> str:
        return f"<RPC method {self._method.__qualname__} of {self._obj!r}>"


def _future_of(annotation: Any) -> Any:
    """``Start[T]`` (as written, a string under PEP 563) -> ``AsyncAPIFuture[T]``."""
    if isinstance(annotation, str) and annotation.startswith("Start[") and annotation[-1] == "]":
        return f"AsyncAPIFuture[{annotation[len('Start[') : -1]}]"
    raise TypeError(f"an RPC method must be annotated -> Start[T], not {annotation!r}")

"""`ReadOnly`: a public attribute that shows a value an object keeps privately.

The clients expose what they hold (a model's id, the configuration, the transport's
URL) as read-only attributes, each declared in one line that names the private value
it shows, its type and its documentation::

    class Client:
        model_id: ReadOnly[str] = ReadOnly("_model_id", "The trainer's id of this model.")

Reading ``client.model_id`` returns ``client._model_id`` (a dotted path reads through
attributes: ``"_spec.base_model"``); assigning it raises `AttributeError`, as for a
property without a setter. Values computed on each read stay properties.
``scripts/gen_sync.py`` gives each one the blocking facade as a property that reads
the async object's.
"""

from __future__ import annotations

import operator
from typing import Any, Generic, Never, NoReturn, Self, TypeVar, overload

__all__ = ["ReadOnly"]

T = TypeVar("T")


class ReadOnly(Generic[T]):
    """A read-only attribute showing the value at ``path`` on the instance.

    Args:
        path: The attribute to read, dotted to read through attributes.
        doc: The attribute's documentation.
    """

    def __init__(self, path: str, doc: str) -> None:
        self.path = path
        self.__doc__ = doc
        self._read = operator.attrgetter(path)
        self._name = path

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type[Any] | None = None) -> Self | T:
        if instance is None:
            return self
        value: T = self._read(instance)
        return value

    def __set__(self, instance: object, value: Never) -> NoReturn:
        # Typed so that the type checker refuses an assignment too.
        raise AttributeError(f"{self._name} is read-only")

    def __repr__(self) -> str:
        return f"ReadOnly({self.path!r})"

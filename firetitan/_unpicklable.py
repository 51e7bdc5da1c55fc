"""`Unpicklable`: the base of objects bound to live connections, tasks or secrets."""

from __future__ import annotations

from typing import ClassVar, NoReturn

__all__ = ["Unpicklable"]


class Unpicklable:
    """Refuses to be pickled, saying why (the class's ``_unpicklable`` reason): a copy
    would share nothing with the live original, and could carry a secret."""

    __slots__ = ()

    _unpicklable: ClassVar[str]

    def __reduce__(self) -> NoReturn:
        raise TypeError(self._unpicklable)

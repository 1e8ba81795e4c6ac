"""A name -> object table with a decorator to fill it, as in detectron2 and timm."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from detectors.errors import UserInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered under the names users write in configs and on the command line."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserInputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    __getitem__ = get

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

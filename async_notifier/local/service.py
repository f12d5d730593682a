"""The shape every local server here shares: `start()`, `stop()`, and `with` for both."""

from __future__ import annotations

import abc
from typing import Self


class Service(abc.ABC):
    """`with service:` starts it and stops it however the block ends."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None:
        """Safe to call twice, and after a start that failed."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

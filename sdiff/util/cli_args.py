"""Argument conventions shared by every parser of the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["ExtendList"]


class ExtendList(argparse.Action):
    """A list option that may be repeated: ``--set a=1 --set b=2 c=3`` gives all three values
    (argparse's default ``store`` keeps only the last repeat, silently). Given at all, the
    option replaces its default list rather than extending it. Use it for every option with
    ``nargs="+"`` or ``"*"``; a test checks that every parser does."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.extend(values if isinstance(values, (list, tuple)) else [values])
        setattr(namespace, self.dest, items)

"""Argument conventions shared by every parser of the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["ExtendList", "KeyValueList"]


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


class KeyValueList(ExtendList):
    """``ExtendList`` of ``KEY=VALUE`` items (``--set``, ``--executor-opt``). An item without
    ``=`` is almost always a positional argument the list swallowed (``sdiff ablate --set
    train.lr=1e-4 2``: argparse hands the ``2`` to ``--set``); it is refused with that said,
    instead of failing later as an override that names no field."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        items = values if isinstance(values, (list, tuple)) else [values]
        for item in items:
            key, sep, _ = str(item).partition("=")
            if not sep or not key:
                parser.error(
                    f"{option_string} takes KEY=VALUE items, and {item!r} is not one: an "
                    f"argument after {option_string} is read as one of its items, so put "
                    f"positional arguments before {option_string} (or end its list with --)"
                )
        super().__call__(parser, namespace, values, option_string)

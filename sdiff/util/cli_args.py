"""Argument conventions shared by every parser of the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["ExtendList", "KeyValueList", "renamed", "show_defaults"]


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
        given = values if isinstance(values, (list, tuple)) else [values]
        for item in given:
            self.check(parser, item, option_string)
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.extend(given)
        setattr(namespace, self.dest, items)

    def check(self, parser: argparse.ArgumentParser, item: Any, option: str | None) -> None:
        """A hook for lists whose items have a form (``KeyValueList``); any item goes here."""


class KeyValueList(ExtendList):
    """``ExtendList`` of ``KEY=VALUE`` items (``--set``, ``--executor-opt``). An item without
    ``=`` is almost always a positional argument the list swallowed (``sdiff ablate --set
    train.lr=1e-4 2``: argparse hands the ``2`` to ``--set``); it is refused with that said,
    instead of failing later as an override that names no field."""

    def check(self, parser: argparse.ArgumentParser, item: Any, option: str | None) -> None:
        key, sep, _ = str(item).partition("=")
        if not sep or not key:
            parser.error(
                f"{option} takes KEY=VALUE items, and {item!r} is not one: an argument after "
                f"{option} is read as one of its items, so put positional arguments before "
                f"{option} (or end its list with --)"
            )


def renamed(*old: str, action: type[argparse.Action] | None = None) -> type[argparse.Action]:
    """The action of an option that got a clearer name: ``old`` spellings, listed after the
    new one in ``add_argument``, still work and print a one-line note naming the new one on
    stderr. ``action`` is the option's own action class (default: store).

        p.add_argument("--run-preset", "--preset", dest="preset", action=renamed("--preset"))
    """
    base = action or argparse._StoreAction

    class Renamed(base):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            if option_string in old:
                new = next(s for s in self.option_strings if s not in old)
                print(f"{parser.prog}: note: {option_string} is now {new} (the old spelling "
                      "still works)", file=sys.stderr)  # fmt: skip
            super().__call__(parser, namespace, values, option_string)

    Renamed.__name__ = f"Renamed{base.__name__}"
    return Renamed


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``parser`` (and of its subcommands) whose default is a value says it in
    ``--help`` ("(default: 64)"); options whose help already names their default, flags and
    options without a default are left as they are. Returns the parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                show_defaults(sub)
            continue
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            continue
        text = action.help or ""
        if "default" in text.lower():
            continue
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if shown == "" or shown == []:
            continue
        action.help = (f"{text} " if text else "") + f"(default: {shown})".replace("%", "%%")
    return parser

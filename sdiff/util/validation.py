"""Range checks for the numeric fields of config dataclasses, declared as one table per section.

Each config section (``train``, ``data``, ``model``, ``diffusion``, ...) keeps a table next to
its dataclass that maps every numeric field to a ``Range``, and its ``__post_init__`` calls
``check_fields`` before any other check. A bad number then fails when the config is parsed
(``sdiff train --dry-run``) with one line that names the dotted field and the value, rather than
later inside ``torch.optim.Adam``, as a ZeroDivisionError, or not at all.

Every value must be finite. NaN compares false with everything, so a check written as
``if grad_clip < 0: raise`` lets it through and the trainer then reads it as "no clipping";
JSON's ``NaN`` and ``Infinity`` parse to floats through ``--set``. Bools are not numbers here,
although ``bool`` subclasses ``int``. For example, in ``TrainConfig.__post_init__``:

    TRAIN_RULES = {"lr": Range(gt=0), "betas": Range(ge=0, lt=1), "batch_size": POSITIVE_INT}
    check_fields(self, "train", TRAIN_RULES)
    # lr=inf:            ValueError: train.lr must be > 0 and finite; got inf
    # betas=(1.0, 0.99): ValueError: train.betas[0] must lie in [0, 1); got 1.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FINITE", "NON_NEGATIVE_INT", "POSITIVE_INT", "SEED", "Range", "check_fields"]


@dataclass(frozen=True)
class Range:
    """The interval a numeric field, or each item of a tuple field, must lie in.

    ``ge`` or ``gt`` bounds it below, ``le`` or ``lt`` above; None leaves that side open. With
    ``integer`` the value must be an int, otherwise any real number. The value must be finite
    whatever the bounds.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None:
            raise ValueError(f"{self}: give ge or gt, not both")
        if self.le is not None and self.lt is not None:
            raise ValueError(f"{self}: give le or lt, not both")

    def admits(self, value: Any) -> bool:
        """Whether ``value`` is a number of the right kind, finite, and within the bounds."""
        kind = numbers.Integral if self.integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return False  # ints are always finite (and math.isfinite overflows on huge ones)
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def describe(self) -> str:
        """What an admitted value is, worded to follow "must" in an error message."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            interval = f"{left}{low}, {high}{right}"
            return f"be an integer in {interval}" if self.integer else f"lie in {interval}"
        if low is not None:
            bound = f"{'>=' if self.ge is not None else '>'} {low}"
        elif high is not None:
            bound = f"{'<=' if self.le is not None else '<'} {high}"
        else:
            bound = ""
        if self.integer:
            return f"be an integer {bound}".rstrip()
        return f"be {bound} and finite" if bound else "be finite"


# Rules most tables share.
FINITE = Range()
POSITIVE_INT = Range(ge=1, integer=True)  # sizes, counts, resolutions, steps
NON_NEGATIVE_INT = Range(ge=0, integer=True)  # where 0 means "none" or "off"
# numpy's legacy RandomState (torch-fidelity's KID subsets) takes seeds below 2^32, and the
# trainer's derived seeds (seed * 1_000_003 + epoch) stay within torch's 64-bit seeds.
SEED = Range(ge=0, lt=2**32, integer=True)


def check_fields(obj: Any, section: str, rules: Mapping[str, Range]) -> None:
    """Check the fields of ``obj`` named in ``rules``; raise ValueError on the first bad value.

    ``section`` is the dotted prefix of the fields in messages (``train``, ``diffusion.schedule``).
    A tuple (or list) field is checked item by item; a field that is None (an Optional number
    left unset) is skipped.
    """
    for name, rule in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        items = enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, item in items:
            if not rule.admits(item):
                where = f"{section}.{name}" if i is None else f"{section}.{name}[{i}]"
                raise ValueError(f"{where} must {rule.describe()}; got {item!r}")

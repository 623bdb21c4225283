"""A sweep's runs as groups: one per combination of the swept parameters a claim does not fix, labelled,
matched against a claim's `where`/`from`/`to`, and the backend that ran them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pandas as pd
from servebench.workbench.documents import fmt

BACKEND, SIM = "backend", "sim"


def groups(rows: pd.DataFrame, df: pd.DataFrame, exclude: set[str]
           ) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """({parameter: value}, rows) per combination of the swept parameters not in `exclude` (backend
    included, when swept: plots label each line with it, `condition_label` leaves it out of verdict rows)."""
    cols = [c for c in df.attrs["swept"] if c not in exclude and c in rows.columns]
    if not cols or rows.empty:
        if not rows.empty:
            yield {}, rows
        return
    for key, g in rows.groupby(cols, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(cols, key, strict=True)), g


def condition_label(values: dict[str, Any]) -> str:
    """A verdict row's condition: the group's parameter values but the backend, which has its own column."""
    return label({k: v for k, v in values.items() if k != BACKEND})


def backend_of(rows: pd.DataFrame) -> str:
    """The backend that ran these runs (summary.json's `backend`; sim where older runs lack it)."""
    names = rows[BACKEND].dropna().unique() if BACKEND in rows.columns else []
    if len(names) > 1:
        raise ValueError(f"study: runs of backends {', '.join(map(str, names))} share a condition: sweep "
                         "them as a Hydra override (backend=sim,engine)")
    return str(names[0]) if len(names) else SIM


def match(df: pd.DataFrame, where: dict[str, Any]) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for key, value in where.items():
        if key not in df.columns:
            have = ", ".join(df.attrs["params"])
            raise ValueError(f"study: {key!r} is not a parameter of this sweep (have: {have})")
        mask &= df[key].map(lambda v, want=value: _same(v, want))
    return mask


def _same(a: Any, b: Any) -> bool:
    if missing(a) or missing(b):
        return missing(a) and missing(b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9)
    return str(a).lower() == str(b).lower()


def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == "null"


def label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items())

"""Reading a CSV file that must have some columns (a workload trace, an engine profile): a bad file fails on
one line that names it, not with a traceback from deep inside pandas. Here, not in workbench/, because the
simulator reads profiles and may not import the harness above it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def read_csv(path: Path, columns: Sequence[str], remedy: str = "") -> pd.DataFrame:
    """The table at `path`; ValueError if it is not there (`remedy`, if given, says how to make it), is no
    readable CSV or lacks one of `columns`."""
    if not path.is_file():
        raise ValueError(f"{path} not found" + (f": {remedy}" if remedy else ""))
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({' '.join(str(e).split())})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df

"""Helpers the source adapters share: reading a CSV with the columns it must have."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covid_cxr.errors import DataError


def read_table(path: Path, required: tuple[str, ...], *, fix: str) -> pd.DataFrame:
    """Read a CSV as text; a missing file or column raises :class:`DataError` naming it and ``fix``."""
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc}); {fix}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has {', '.join(frame.columns[:12])}); {fix}"
        )
    return frame

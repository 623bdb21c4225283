"""A digest of the sources a whole-step profile measures: the engine (less its HTTP server) and the kernels.

engine/profile.py writes it into a profile's meta.json; the simulator compares it with the checkout's own and
warns when they differ (the profile may no longer describe this code). Comments, docstrings and blank lines
are left out, so editing prose does not make a profile stale; any change to code does.
"""

from __future__ import annotations

import hashlib
import io
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEASURED = ("engine", "kernels")  # folders whose code sets a step's time
NOT_MEASURED = ("engine/server", "engine/digest.py")  # the HTTP front end and this file: no part of a step
KNOWN_STALE = "known_stale"  # a meta key whose value says why a profile is kept although the code changed


def measured_files(root: Path = REPO) -> list[Path]:
    files = [p for folder in MEASURED for p in (root / folder).rglob("*.py")]
    rel = (p.relative_to(root).as_posix() for p in files)
    return sorted(p for p, r in zip(files, rel) if not r.startswith(NOT_MEASURED))


def code_only(source: str) -> str:
    """`source` without comments, docstrings (a string that is a whole statement) and blank lines."""
    drop: list[tuple[tuple[int, int], tuple[int, int]]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    starts_line = True
    for tok, nxt in zip(tokens, tokens[1:]):
        if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and starts_line
                                            and nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER)):
            drop.append((tok.start, tok.end))
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            starts_line = tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    lines = source.splitlines()
    for (r0, c0), (r1, c1) in reversed(drop):  # from the end: earlier positions stay valid
        lines[r0 - 1:r1] = [lines[r0 - 1][:c0] + lines[r1 - 1][c1:]]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def source_digest(root: Path = REPO) -> str:
    """sha256 (first 16 hex digits) over the measured files' paths and code."""
    h = hashlib.sha256()
    for path in measured_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(code_only(path.read_text()).encode() + b"\0")
    return h.hexdigest()[:16]


def stale_warning(what: str, meta: dict) -> str | None:
    """One line when `meta` (a profile's meta.json, a calibration's meta) records other code than this
    checkout's, or none; None when they match."""
    recorded, current = meta.get("source_digest"), source_digest()
    if recorded == current:
        return None
    known = f" (known: {meta[KNOWN_STALE]})" if KNOWN_STALE in meta else ""
    if recorded is None:
        return f"{what} records no source digest: it may not describe this engine's code{known}"
    return (f"{what} measured engine code {recorded}, this checkout's is {current}: re-profile and "
            f"recalibrate for the changed code{known}")

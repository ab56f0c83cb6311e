"""Write an output folder atomically: into a temporary sibling, renamed when complete.

A failure (an exception, a killed process) leaves at most ``<name>.tmp-<pid>``, never a
folder under the final name that looks finished.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pretrain.convert.families import ConvertError


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to fill; on success rename it to ``out``, on
    an exception delete it and re-raise. Raises ConvertError when ``out`` already exists (a
    conversion never overwrites a folder)."""
    out = Path(out)
    if out.exists():
        raise ConvertError(f"{out}: already exists; choose a new output folder")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise ConvertError(f"{out}: cannot create it ({exc.strerror or exc})") from None
    try:
        yield tmp
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Writing a directory so that readers see the old one or the whole new one, never a half-written one."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; when the block ends normally it replaces `target`
    (an old `target` is moved aside first and deleted last), when it raises it is removed and `target` is
    left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "dir")
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

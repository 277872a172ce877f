"""Writing files and directories so that readers see the old one or the whole new one, never a half-written one."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gemma_fusion.core.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


def disk_full(err: BaseException) -> str | None:
    """The OS's words when `err` is a full disk (or quota, or file-size limit), else None. safetensors' writer
    reports the OS error only in its message ("... (os error 28)")."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (match := re.search(r"\(os error (\d+)\)", str(err))):
        code = int(match[1])
    return os.strerror(code) if code in DISK_FULL else None


@contextmanager
def replaced_atomically(path: str | Path, intact: str) -> Iterator[Path]:
    """Yield `path` + ".tmp" to write; when the block ends it is fsynced and renamed onto `path`.

    A kill leaves at most the .tmp file (readers ignore it); an error removes it. A full disk (or quota, or
    file-size limit) becomes one sentence that says what was not written and what is `intact`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if reason := disk_full(err):
            raise UserError(f"Could not write {path} ({reason}); {intact}.") from err
        raise


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `target`; when the block ends normally it replaces `target`
    (an old `target` is moved aside first and deleted last), when it raises it is removed and `target` is
    left as it was (a full disk says so in one sentence)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if reason := disk_full(err):
            raise UserError(f"Could not write {target} ({reason}); nothing was written there: free space and "
                            "run the command again.") from err
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / "dir")
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

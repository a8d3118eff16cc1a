"""Files written whole or not at all: a crash or an error never leaves a half-written file under its name."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomically(dest: Path, write) -> None:
    """Calls write(temporary path) beside `dest`, syncs, then renames: a crash or an error never leaves a
    half-written file under `dest`'s name.

    The temporary path lies in a folder made for this call in `dest`'s folder, with a unique name, created
    exclusively and private (0700: `mkdtemp`): nothing planted under a guessable name (a symlink, a user's own
    `run.html.tmp`) is followed or consumed, whatever `write` does with the path (safetensors replaces the file
    it writes). The file gets the permissions of any new file, 0666 minus the umask, then is renamed over `dest`.
    """
    dest = Path(dest)
    folder = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    tmp = folder / dest.name
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask

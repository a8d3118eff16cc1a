"""Files the project writes: whole or not at all (`write_atomically`), or, for --output, appended to in place but never
through a link or into a FIFO or device, and by one run at a time (`open_output`)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
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


def write_page(flag: str, dest: Path, text: str) -> None:
    """`text` written whole to `dest` (`write_atomically`), UTF-8; a failure (a full disk, a folder gone) is a
    ValueError naming `flag` and the file."""
    try:
        write_atomically(Path(dest), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{flag} {dest}: the page could not be written ({e.strerror or e}): free some space or "
                         f"choose another folder") from None


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


def open_output(name: str, *, truncate: bool) -> int:
    """A descriptor that appends to --output `name`, a regular file (emptied if `truncate`) or a new one, locked for
    this process (an advisory lock, `flock`, released when the descriptor closes).

    Never written through a symbolic link, and never opened for writing when it is not a regular file: a FIFO
    would block until a reader comes and hand that reader an end of file, a device may act on being opened. A
    file another run holds is refused: two runs would mix their lines, and each one's cut-back after an error
    could cut the other's. ValueError, one line, for what is refused or cannot be opened.
    """
    try:
        before = os.lstat(name)
    except FileNotFoundError:
        before = None
    except OSError as e:
        raise ValueError(f"--output {name}: cannot reach it ({e.strerror or e}): choose another file") from None
    if before is not None:
        refuse_unless_regular("--output", name, before)
    # O_NOFOLLOW and O_EXCL: should a link or a FIFO take the name after the look above, the open fails rather than
    # following it; O_NONBLOCK: nor can it wait (on a regular file the flag changes nothing).
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | (os.O_CREAT | os.O_EXCL if before is None else 0), 0o666)
    except OSError as e:
        raise ValueError(f"--output {name}: cannot write it ({e.strerror or e}): choose another file") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (before is not None and (before.st_dev, before.st_ino) != (
            after.st_dev, after.st_ino)):
        os.close(fd)
        raise ValueError(f"--output {name} changed while it was opened: run again")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"--output {name} is being written by another run: wait for it to finish, or choose "
                         f"another file") from None
    if truncate:
        os.ftruncate(fd, 0)
    return fd


def refuse_unless_regular(flag: str, name: str, status: os.stat_result) -> None:
    """ValueError, naming `flag`, unless `status` (an lstat) is a regular file's, outside the kernel's /proc and
    /sys (whose files take no results: writing one fails, or changes the system)."""
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        raise ValueError(f"{flag} {name} is a symbolic link, which is never written through: give the file it "
                         f"points to, or a new name")
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device")
        instead = " (or leave out --output to write the lines to stdout)" if flag == "--output" else ""
        raise ValueError(f"{flag} {name} is {kind}, not a regular file: give a regular file or a new name{instead}")
    kernel = on_kernel_filesystem(status)
    if kernel:
        raise ValueError(f"{flag} {name} is a file of the kernel's {kernel}, not one to write to: choose another file")


def on_kernel_filesystem(status: os.stat_result) -> str | None:
    """"/proc" or "/sys" when `status` is of a file on one of them, else None."""
    for root in ("/proc", "/sys"):
        try:
            if os.stat(root).st_dev == status.st_dev:
                return root
        except OSError:
            pass
    return None

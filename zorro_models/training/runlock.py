"""One owner per run folder: an advisory lock that training (``zorro train``, ``--resume``, each run of ``zorro
ablate`` and ``zorro demo``) and the ablate and demo commands take on their folder before they write anything in it,
so that a second process into the same folder stops at once with a line naming the first.

    with RunLock.acquire("runs/x", say=print):   # RunFolderInUse: runs/x is in use by pid 4242 on host-a (...)
        ...

The lock is ``flock`` on ``<folder>/.zorro.lock``. The kernel drops it when its holder ends, however it ends (kill -9
included), so a dead owner never blocks a folder: whether a folder is owned is the lock itself, never the file. The
file's content (the owner's pid, host, command and start time) is information only: for the refusal line, and for
noticing that the last owner ended without releasing the lock (it was killed or crashed; its run may be resumed).
The lock is only as good as the file system's ``flock``: local file systems and NFS honour it; mounts that refuse it
make :meth:`RunLock.acquire` raise, in our words, rather than run unowned.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Union

try:
    import fcntl
except ImportError:  # not a POSIX system: no flock
    fcntl = None

__all__ = ["LOCK_FILE", "RunLock", "RunFolderInUse", "describe_owner"]

LOCK_FILE = ".zorro.lock"


class RunFolderInUse(OSError):
    """Another process owns the run folder; the message names it (pid, host, command, since when)."""


def describe_owner(owner: Optional[dict]) -> str:
    """``pid 4242 on host-a (zorro train train.out=runs/x), since 2026-12-07T05:01:02+0000`` for a lock file's
    content; a lock file that is empty or unreadable (its owner has just taken it, or wrote it half) says so."""
    if not owner or "pid" not in owner:
        return "another process (which has not written its name into the lock file yet)"
    text = f"pid {owner['pid']} on {owner.get('host', '?')}"
    if owner.get("command"):
        text += f" ({owner['command']})"
    return text + (f", since {owner['since']}" if owner.get("since") else "")


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0]:
        argv[0] = os.path.basename(argv[0])
    text = " ".join(argv) or "python"
    return text if len(text) <= 200 else text[:197] + "..."


def _read(fd: int) -> Optional[dict]:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        owner = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """The lock on one run folder, held from :meth:`acquire` until :meth:`release` (or the end of the process, or the
    object's collection). Attributes: ``folder``, ``path`` (the lock file), ``previous`` (the content left by an
    owner that ended without releasing the lock, else None)."""

    def __init__(self, folder: Path, fd: int, previous: Optional[dict]):
        self.folder, self.path, self.previous = folder, folder / LOCK_FILE, previous
        self._fd: Optional[int] = fd

    @classmethod
    def acquire(
        cls, folder: Union[str, Path], *, what: Optional[str] = None, say: Optional[Callable[[str], object]] = None
    ) -> "RunLock":
        """Create ``folder`` if needed and lock it, or raise :class:`RunFolderInUse` naming the owner. ``what`` names
        the folder in messages (e.g. ``"train.out=runs/x"``; default: the path); ``say`` gets a line when the last
        owner ended without releasing the lock."""
        folder = Path(folder)
        what = what or str(folder)
        if fcntl is None:
            raise OSError(f"cannot lock {what}: this system has no flock (fcntl), so one owner per folder is not kept")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            mine = bool(owner) and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
            hint = (
                "an earlier Trainer of this process still holds it (let its fit() finish, or call its close())"
                if mine
                else "one process per run folder: wait for it to end, or choose another folder"
            )
            raise RunFolderInUse(f"{what} is in use by {describe_owner(owner)}; {hint}") from None
        except OSError as e:
            os.close(fd)
            raise OSError(e.errno, f"cannot lock {what} ({path}): {e.strerror}") from None
        previous = _read(fd)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _command(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode("utf-8"), 0)
        except OSError as e:  # a full disk: the lock holds all the same (it is the flock); say so and go on
            if say is not None:
                say(f"{what}: could not write the owner into {path} ([Errno {e.errno}] {e.strerror}); locked anyway")
        if previous is not None and say is not None:
            say(
                f"{what}: its last owner, {describe_owner(previous)}, ended without releasing it (killed or "
                f"crashed); taking the folder over"
            )
        return cls(folder, fd, previous)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file (a clean end: the next owner has nothing to report) and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the folder was deleted or the disk is gone: the lock itself still goes below
            pass
        finally:
            # LOCK_UN before close: DataLoader workers forked meanwhile share this open file, and would otherwise
            # keep the lock until they exit
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter exit modules may be gone; the kernel drops it anyway
                self.release()

"""What a sandbox takes from the platform before any learner code runs in it.

A new process group (the grader kills it whole), no network and a private view of the
files (Linux namespaces: the course's solutions, tests and git history, the submissions and
the grader's output replaced by empty folders), a user of its own (when started by root),
limits on memory, processes and file size, and an empty environment. Each step that the
platform refuses is skipped, and `confine` says which held.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import tempfile
from dataclasses import dataclass

import torch

FIRST_UID = 100_000  # sandboxes started by root run as FIRST_UID + pid: a user of their own
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 0x40000


@dataclass(frozen=True)
class Limits:
    memory: int = 8 * 2**30  # bytes of address space
    processes: int = 64  # processes and threads the learner's code may add
    file_size: int = 64 * 2**20  # bytes any file the code writes may reach
    output: int = 1_000_000  # characters of printed output kept per cell
    hide: tuple[str, ...] = ()  # folders replaced by an empty one (solutions, tests, OUT)
    workdir: str = "."  # the learner's working folder, empty but for what the grader put there
    threads: int = 1  # OMP_NUM_THREADS: a share of the cores


def confine(limits: Limits) -> list[str]:
    """Apply every restriction this platform allows; name the ones that held."""
    enforced = []
    os.setsid()  # the grader kills the whole group: loops that ignore signals, forks
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails, it does not kill
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    # RLIMIT_NPROC counts the real user's processes: a user of our own has none yet.
    processes = limits.processes + (0 if root else _tasks(processes_of(uid)))
    flags = CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    namespaces = libc.unshare(flags) == 0
    if namespaces:
        enforced.append("no network")
        if not root:  # map ourselves to root inside the new user namespace, to mount
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
        libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        hidden = [p for p in limits.hide if os.path.isdir(p)]
        if all(_mount(libc, "tmpfs", p, "tmpfs", 0, "size=1m") for p in hidden):
            enforced.append("private folders hidden")
        if root:
            _expose(libc, [sys.base_prefix, sys.prefix, *sys.path, limits.workdir])
    os.chdir(limits.workdir)
    if root and namespaces:  # without them Python's own files may be out of the user's reach
        user = FIRST_UID + os.getpid()
        os.chown(limits.workdir, user, user)
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
        enforced.append("unprivileged user")
    caps = [(resource.RLIMIT_NPROC, processes), (resource.RLIMIT_FSIZE, limits.file_size),
            (resource.RLIMIT_CORE, 0)]  # fmt: skip
    # CUDA reserves far more address space than any memory cap: on a GPU machine the cap
    # would make every CUDA case fail, so there it is left off (and the summary says so).
    if not os.path.exists("/dev/nvidiactl"):
        caps.append((resource.RLIMIT_AS, limits.memory))
        enforced.append("memory limit")
    for which, value in caps:
        resource.setrlimit(which, (value, value))
    enforced.append("process and file-size limits")
    os.environ.clear()  # the grader's environment may hold secrets
    os.environ.update(PATH="/usr/bin:/bin", HOME=limits.workdir, MPLBACKEND="Agg",
                      OMP_NUM_THREADS=str(limits.threads))  # fmt: skip
    torch.set_num_threads(limits.threads)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # output written below Python (os.write, C code) goes nowhere
    os.dup2(devnull, 2)
    return enforced


def _mount(libc, source: str, target: str, kind: str | None, flags: int, data: str = "") -> bool:
    fs = kind.encode() if kind else None
    return libc.mount(source.encode(), target.encode(), fs, flags, data.encode() or None) == 0


def _expose(libc, needed: list[str]) -> None:
    """Make the folders Python and the course live in reachable for an unprivileged user,
    inside this private mount namespace: a parent folder others may not enter (/root, say)
    is replaced by an empty one holding only the needed entry, mounted back in place."""
    closed: dict[str, set[str]] = {}
    for path in filter(os.path.isdir, map(os.path.realpath, needed)):
        parts = path.split(os.sep)[1:]
        for i in range(len(parts) - 1):
            folder = os.sep + os.path.join(*parts[: i + 1])
            if not os.stat(folder).st_mode & 0o001:
                closed.setdefault(folder, set()).add(parts[i + 1])
                break
    for folder, entries in closed.items():
        staged = {e: tempfile.mkdtemp() for e in entries}
        for entry, place in staged.items():
            _mount(libc, os.path.join(folder, entry), place, None, MS_BIND | MS_REC)
        _mount(libc, "tmpfs", folder, "tmpfs", 0, "mode=755,size=1m")
        for entry, place in staged.items():
            os.mkdir(os.path.join(folder, entry))
            _mount(libc, place, os.path.join(folder, entry), None, MS_MOVE)
            os.rmdir(place)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def processes_of(uid: int) -> list[int]:
    """The ids of the user's processes."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _tasks(pids: list[int]) -> int:
    """Processes and threads, as RLIMIT_NPROC counts them."""
    count = 0
    for pid in pids:
        try:
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count

"""A warm process that forks sandboxes, so each starts in milliseconds with torch imported.

It is started by the grader with a clean import (no grader state, no gradebook connection,
nothing computed by a check) and holds only the libraries a learner's code may use. Each
request carries a socket; the forked child serves one sandbox on it (`sandbox.serve`).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
from multiprocessing.connection import Connection

PRELOAD = ("torch", "IPython.core.interactiveshell", "transformer_course.model",
           "transformer_course.data", "transformer_course.checks.core",
           "transformer_course.grading.sandbox")  # fmt: skip


def main(control_fd: int) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    _warm_up()
    from .confine import Limits
    from .sandbox import serve

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished sandboxes
    control = socket.socket(fileno=control_fd)
    while True:
        message, fds, _, _ = socket.recv_fds(control, 2**16, 1)
        if not message or not fds:
            os._exit(0)  # the grader is gone
        limits = json.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                serve(Connection(fds[0]), Limits(**limits))
            finally:
                os._exit(1)
        os.close(fds[0])
        control.send(json.dumps({"pid": pid}).encode())


def _warm_up() -> None:
    """Pay once, here, what PyTorch does on first use and every sandbox would pay again:
    autograd's engine (about 0.2 s) and the meta device's kernels under a dispatch mode (about
    1 s), which the checks' gradient and meta cases need."""
    import torch

    from ..checks.core import NoCpuTensors

    x = torch.randn(2, 3, 4, requires_grad=True)
    torch.autograd.grad((x @ x.transpose(-2, -1)).softmax(-1).sum(), x)
    with NoCpuTensors():
        m = torch.empty(2, 3, 4, device="meta")
        mask = torch.ones(3, 3, dtype=torch.bool, device="meta")
        (m @ m.transpose(-2, -1)).masked_fill(~mask, float("-inf")).softmax(-1) @ m


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))

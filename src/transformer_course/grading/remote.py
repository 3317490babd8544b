"""The grader's side of a sandbox: the learner's functions and modules, as seen from outside.

A check is handed stand-ins for the learner's objects. Calling a stand-in sends the inputs to
the sandbox as tensors and brings back tensors; the check then compares them, in this
process, with references it computed itself. A learner's module is mirrored here as a module
of the same structure, with the same parameter names and shapes, whose forward runs in the
sandbox: the check copies weights into the mirror as it would into the real module, and the
mirror's state travels with every call. Gradients come back through `torch.autograd`, the
random generator's state goes there and back, and the check's instrumentation (no CPU
tensors on meta, forbidden library calls, the course's references) is switched on in there
for the call and its findings added to the check's own.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from multiprocessing.connection import Connection

import torch
import torch.nn as nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode_stack

from ..checks.core import CpuTensorUsed, FirstStep, LibraryCalls, NoCpuTensors, ReferenceCalls
from . import wire
from .confine import FIRST_UID, Limits, processes_of
from .sandbox import (
    apply_state,
    flat_tensors,
    module_state,
    own_state,
    qualified,
    resolve,
)

START_TIMEOUT = 120  # seconds a new sandbox may take to start
# What a learner's error is raised as here, by the nearest class name in its MRO: Python's
# exceptions, and the two the checks themselves catch.
_EXCEPTIONS = {
    **{name: obj for name, obj in vars(builtins).items()
       if isinstance(obj, type) and issubclass(obj, Exception) and obj is not Exception},
    "CpuTensorUsed": CpuTensorUsed,
    "FirstStep": FirstStep,  # a training loop on meta, stopped where the check wanted
}  # fmt: skip


class SandboxStopped(BaseException):
    """The learner's code ran past the time limit; the sandbox was killed. A BaseException,
    so that the checks' own error handling passes it up to the grader."""


class SandboxDied(BaseException):
    """The sandbox process ended while running the learner's code (os._exit, a signal)."""


class Sandbox:
    def __init__(self, limits: Limits):
        self.pid, self.conn = _fork(limits)
        self.deadline = time.monotonic() + START_TIMEOUT
        self.sent: dict[int, nn.Module] = {}  # modules sent by value, by token
        self.shells: dict[tuple, type] = {}
        self.mirrors: dict[int, nn.Module] = {}  # the learner's modules, by the sandbox's id
        self.hook_failure: BaseException | None = None
        ready = self._receive()
        self.enforced, self.uid = ready["ready"], int(ready["uid"])
        self.deadline = None

    # -- the process ------------------------------------------------------------------------

    @contextmanager
    def limit(self, seconds: float | None):
        """Every request inside must be answered within `seconds` in all."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield self
        finally:
            self.deadline = None

    def kill(self) -> None:
        """SIGKILL to the sandbox's process group: its children and SIGINT-proof loops too;
        and, when it runs as a user of its own, to every process of that user (a child that
        left the group with setsid, the survivors of a fork bomb)."""
        for kill in (os.killpg, os.kill):
            try:
                kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.uid >= FIRST_UID:
            while pids := processes_of(self.uid):
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.conn.close()

    def _receive(self):
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 0)
        try:
            ready = self.conn.poll(remaining)
            data = self.conn.recv_bytes(wire.MAX_MESSAGE) if ready else None
        except (EOFError, OSError):
            self.kill()
            raise SandboxDied("the process running the learner's code died") from None
        if data is None:
            self.kill()
            raise SandboxStopped("the learner's code ran past the time limit")
        return wire.decode(data, self._in_ref)

    def request(self, message: dict) -> dict:
        with _quiet():
            self.conn.send_bytes(wire.encode(message, self._out_ref))
            while True:
                reply = self._receive()
                if "hook" not in reply:
                    return reply
                self.conn.send_bytes(wire.encode({"stop": not self._run_hooks(reply)}))

    # -- what learners' cells and names become ----------------------------------------------

    def exec(self, source: str) -> dict:
        """Run one learner cell: {"stdout", "stderr", "error"}."""
        return self.request({"op": "exec", "source": source})

    def lookup(self, name: str):
        reply = self.request({"op": "lookup", "name": name})
        if reply.get("missing"):
            raise NameError(f"name {name!r} is not defined: run the cell that defines it")
        _raise_if_error(reply)
        return reply["value"]

    def call(self, ref: int, path: str | None, args: tuple, kwargs: dict, root=None):
        """ref(*args, **kwargs) in the sandbox, or root's submodule at path when path is set."""
        mirrors = [m for m in _modules_in((args, kwargs)) if _is_mirror(m)]
        request = {
            "op": "call", "ref": ref, "path": path, "args": args, "kwargs": kwargs,
            "state": module_state(root) if root is not None else None,
            "rng": torch.get_rng_state(), "grad": torch.is_grad_enabled(), "modes": _modes(),
            "modules": sorted({m._remote_root._remote_id for m in mirrors}),
            "hooks": [{"id": m._remote_root._remote_id, "path": m._remote_path}
                      for m in mirrors if m._forward_pre_hooks],
        }  # fmt: skip
        self.hook_failure = None
        reply = self.request(request)
        if self.hook_failure is not None:
            raise self.hook_failure
        _raise_if_error(reply)
        _record_calls(reply["called"])
        with _quiet():
            torch.set_rng_state(reply["rng"])
            inputs = flat_tensors((args, kwargs))
            for i, value in reply["changed"].items():
                inputs[int(i)].data.copy_(value)  # the learner's code changed an input in place
            for m in mirrors:
                apply_state(m._remote_root, reply["states"].get(str(m._remote_root._remote_id), {}))
            leaves = [t for t in inputs if t.requires_grad]
            if root is not None:
                leaves += [root.get_parameter(n) for n in reply["leaf_params"]]
            return self._with_gradients(reply, leaves)

    def _with_gradients(self, reply: dict, leaves: list[torch.Tensor]):
        value, flags = reply["value"], reply["grad_outputs"]
        outputs = flat_tensors(value)
        if len(flags) != len(outputs):
            raise wire.WireError("the sandbox's gradient flags do not match its outputs")
        if not (torch.is_grad_enabled() and leaves and any(flags)):
            return value
        tracked = _RemoteGradient.apply(self, reply["call_id"], outputs, flags, *leaves)
        return _replace(value, iter(tracked))

    def _run_hooks(self, reply: dict) -> bool:
        """The check's forward pre-hooks on a mirror, for a call the sandbox made; False to stop."""
        module = self.mirrors.get(reply["hook"])
        if module is None:
            return True
        sub = module.get_submodule(reply["path"])
        sub.training = bool(reply["training"])
        try:
            for hook_id, hook in list(sub._forward_pre_hooks.items()):
                if hook_id in sub._forward_pre_hooks_with_kwargs:
                    hook(sub, tuple(reply["args"]), reply["kwargs"])
                else:
                    hook(sub, tuple(reply["args"]))
        except BaseException as failure:  # the check's verdict (a CheckFailed): keep it
            self.hook_failure = failure
            return False
        return True

    # -- references across the pipe ---------------------------------------------------------

    def _out_ref(self, obj):
        if isinstance(obj, nn.Module) and _is_mirror(obj):
            root = obj._remote_root
            return {"id": root._remote_id, "state": module_state(root), "path": obj._remote_path}
        if isinstance(obj, RemoteCallable):
            return {"id": obj.ref}
        name = qualified(obj) if not isinstance(obj, nn.Module) else None
        if name:
            return {"trusted": name}
        if isinstance(obj, nn.Module):  # a check's own module, of trusted classes only
            token = len(self.sent) + 1
            self.sent[token] = obj
            return {"build": _tree(obj), "token": token}
        return None

    def _in_ref(self, plain):
        if not isinstance(plain, dict):
            raise wire.WireError("bad reference")
        if "module" in plain:
            sent = plain["module"].get("sent")
            if sent in self.sent:
                return self.sent[sent]
            return self._mirror(plain["module"], int(plain["id"]))
        if "callable" in plain:
            trusted = resolve(plain["trusted"]) if plain.get("trusted") else None
            if trusted is not None:
                return trusted
            return RemoteCallable(self, int(plain["callable"]))
        raise wire.WireError("bad reference")

    def _mirror(self, desc: dict, ref: int) -> nn.Module:
        root = self._build(desc, "", {})
        object.__setattr__(root, "_remote_id", ref)
        object.__setattr__(root, "_sandbox", self)
        self.mirrors[ref] = root
        for m in root.modules():
            if _is_mirror(m):
                object.__setattr__(m, "_remote_root", root)
        return root

    def _build(self, desc: dict, path: str, built: dict) -> nn.Module:
        """The mirror of the module described at path; `built` maps paths already built to
        their modules and parameters, for the aliases the description refers to."""
        if "alias" in desc:
            return built[str(desc["alias"])]
        if desc.get("sent") in self.sent:
            return built.setdefault(path, self.sent[desc["sent"]])
        trusted = resolve(desc["trusted"]) if path and desc.get("trusted") else None
        if isinstance(trusted, type) and issubclass(trusted, nn.Module):
            cls, mirror = trusted, False  # a library module inside the learner's: runs here
        else:
            cls, mirror = self._shell(desc), True
        m = built[path] = cls.__new__(cls)
        nn.Module.__init__(m)
        if mirror:
            object.__setattr__(m, "_remote_path", path)
        for k, v in desc["attrs"].items():
            vars(m)[k] = v
        for k, t in desc["tensors"].items():
            vars(m)[str(k)] = t
        m._non_persistent_buffers_set = set(map(str, desc["nonpersistent"]))
        params = desc["params"]
        tied = {k: built[str(p["alias"])] for k, p in params.items() if isinstance(p, dict)}
        apply_state(m, {"": {**desc, "params": {k: p for k, p in params.items() if k not in tied}}})
        m._parameters.update(tied)
        for k, p in m._parameters.items():
            built[f"{path}.{k}".lstrip(".")] = p
        for k, sub in desc["modules"].items():
            child = f"{path}.{k}".lstrip(".")
            m._modules[k] = None if sub is None else self._build(sub, child, built)
        return m

    def _shell(self, desc: dict) -> type:
        """A class named like the learner's (and its bases), deriving from the same library
        class, whose forward runs in the sandbox."""
        names = tuple(str(n) for n in desc["names"]) or ("Module",)
        base = resolve(desc["base"]) if desc.get("base") else nn.Module
        if not (isinstance(base, type) and issubclass(base, nn.Module)):
            base = nn.Module
        key = (names, base)
        if key not in self.shells:
            cls = type(names[-1], (RemoteModule, base), {})
            for name in reversed(names[:-1]):
                cls = type(name, (cls,), {})
            self.shells[key] = cls
        return self.shells[key]


class RemoteModule(nn.Module):
    """The mirror of a learner's module: same structure here, forward in the sandbox."""

    def forward(self, *args, **kwargs):
        root = self._remote_root
        return root._sandbox.call(root._remote_id, self._remote_path, args, kwargs, root=root)


class RemoteCallable:
    """A learner's function or class: calling it calls it in the sandbox."""

    def __init__(self, sandbox: Sandbox, ref: int):
        self.sandbox, self.ref = sandbox, ref

    def __call__(self, *args, **kwargs):
        return self.sandbox.call(self.ref, None, args, kwargs)


_zygote: tuple[subprocess.Popen, socket.socket] | None = None


def _fork(limits: Limits) -> tuple[int, Connection]:
    """A new sandbox, forked by this process's zygote (started on first use)."""
    global _zygote
    if _zygote is None or _zygote[0].poll() is not None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-m", "transformer_course.grading.zygote", str(theirs.fileno())]
        process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        _zygote = (process, ours)
    control = _zygote[1]
    mine, child = socket.socketpair()
    socket.send_fds(control, [json.dumps(dataclasses.asdict(limits)).encode()], [child.fileno()])
    child.close()
    pid = json.loads(control.recv(2**16))["pid"]
    return pid, Connection(mine.detach())


def _is_mirror(m) -> bool:
    return isinstance(m, RemoteModule)


class _RemoteGradient(torch.autograd.Function):
    """Outputs computed in the sandbox, with a backward that asks the sandbox for gradients."""

    @staticmethod
    def forward(ctx, sandbox, call_id, outputs, flags, *leaves):
        ctx.sandbox, ctx.call_id, ctx.n = sandbox, call_id, len(leaves)
        ctx.mark_non_differentiable(*[o for o, f in zip(outputs, flags, strict=True) if not f])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        request = {"op": "backward", "call_id": ctx.call_id, "grads": list(grads)}
        reply = ctx.sandbox.request(request)
        _raise_if_error(reply)
        if len(reply["grads"]) != ctx.n:
            raise wire.WireError("the sandbox sent the wrong number of gradients")
        return (None, None, None, None, *reply["grads"])


@contextmanager
def _quiet():
    """The grader's own work, hidden from the check's modes and profiler (it is not the
    learner's, and a profiler called on every call would make it many times slower)."""
    profile = sys.getprofile()
    sys.setprofile(None)
    try:
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            yield
    finally:
        sys.setprofile(profile)


def _modes() -> dict:
    """The check's instrumentation active now, by name, to be switched on in the sandbox."""
    library = [m for m in _get_current_function_mode_stack() if isinstance(m, LibraryCalls)]
    profile = sys.getprofile()
    references = getattr(profile, "__self__", None)
    return {
        "no_cpu": any(isinstance(m, NoCpuTensors) for m in _get_current_dispatch_mode_stack()),
        "library": [n for m in library for n in map(_library_name, m.forbidden) if n],
        "reference": references.names if isinstance(references, ReferenceCalls) else [],
    }


def _record_calls(called: dict) -> None:
    """Add what the sandbox saw to the check's own records, as if the calls were made here."""
    for m in _get_current_function_mode_stack():
        if isinstance(m, LibraryCalls):
            m.called.extend(map(str, called.get("library", [])))
    references = getattr(sys.getprofile(), "__self__", None)
    if isinstance(references, ReferenceCalls):
        references.called.extend(map(str, called.get("reference", [])))


def _library_name(func) -> str | None:
    """PyTorch functions by a name the sandbox can import (F.x lives in torch.nn.functional)."""
    for module in ("torch.nn.functional", "torch"):
        name = getattr(func, "__name__", None)
        if name and getattr(sys.modules[module], name, None) is func:
            return f"{module}:{name}"
    return None


def _raise_if_error(reply: dict) -> None:
    error = reply.get("error") if isinstance(reply, dict) else None
    if not error:
        return
    kind, message = str(error.get("type")), str(error.get("message"))
    for name in map(str, error.get("mro", [])):
        if name in _EXCEPTIONS:
            raise _EXCEPTIONS[name](message)
    raise RuntimeError(f"{kind}: {message}")


def _modules_in(obj):
    if isinstance(obj, nn.Module):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _modules_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _modules_in(o)


def _replace(obj, tensors):
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, tuple):
        return tuple(_replace(o, tensors) for o in obj)
    if isinstance(obj, list):
        return [_replace(o, tensors) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace(o, tensors) for k, o in obj.items()}
    return obj


def _tree(m: nn.Module) -> dict:
    """A module of trusted classes as the sandbox rebuilds it."""
    name = qualified(type(m))
    if name is None:
        raise TypeError(f"a {type(m).__name__} cannot be sent to the sandbox")
    modules = {k: None if s is None else _tree(s) for k, s in m._modules.items()}
    return {"trusted": name, "modules": modules, **own_state(m)}

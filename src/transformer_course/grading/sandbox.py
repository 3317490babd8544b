"""The sandbox: the one process where a learner's code runs while it is graded.

It runs the notebook's learner cells, then answers the grader's requests: call this function
or module on these tensors, give the gradients of that call. It holds no test, no reference
output and no gradebook, and decides nothing: it returns tensors, and the grader, in its own
process, compares them with references it computed itself (see `remote`). Before any learner
code runs it confines itself (see `confine`).
"""

from __future__ import annotations

import io
import itertools
import os
import sys
import traceback

import torch
import torch.nn as nn

from . import wire
from .confine import Limits, confine

TRUSTED = ("torch.", "transformer_course.")  # modules whose classes both sides share
SIMPLE = (type(None), bool, int, float, str, torch.dtype)


def serve(conn, limits: Limits) -> None:
    """The sandbox's main loop: confine this process, then answer requests until EOF."""
    enforced = confine(limits)
    shell = _shell()
    server = _Server(conn, shell, limits)
    conn.send_bytes(wire.encode({"ready": enforced, "uid": os.getuid()}))
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            os._exit(0)
        conn.send_bytes(server.answer(data))


def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance(colors="NoColor")
    shell.showtraceback = lambda *a, **k: None  # the error is read from the result instead
    return shell


class _CappedText(io.TextIOBase):
    """A stdout that keeps the first `cap` characters and counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.parts, self.kept, self.dropped = cap, [], 0, 0

    def writable(self):
        return True

    def write(self, text):
        text = str(text)
        room = self.cap - self.kept
        self.parts.append(text[: max(room, 0)])
        self.kept += min(len(text), max(room, 0))
        self.dropped += max(len(text) - max(room, 0), 0)
        return len(text)

    def text(self) -> str:
        note = f"\n[output cut: {self.dropped:,} more characters]\n" if self.dropped else ""
        return "".join(self.parts) + note


def qualified(obj) -> str | None:
    """'module:qualname' when obj is a trusted library's own object under that name."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str):
        return None
    if not module.startswith(TRUSTED) or resolve(f"{module}:{name}") is not obj:
        return None
    return f"{module}:{name}"


def resolve(name: str):
    """The trusted object called `module:qualname`, or None."""
    module, _, qual = str(name).partition(":")
    if not module.startswith(TRUSTED) or module not in sys.modules and not qual:
        return None
    try:
        obj = __import__(module, fromlist=["_"])
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj


def trusted_class(cls) -> str | None:
    """The nearest class in cls's MRO that a trusted library defines."""
    for c in cls.__mro__:
        name = qualified(c)
        if name:
            return name
    return None


def module_state(m: nn.Module) -> dict:
    """What the grader keeps in step: each submodule's parameters, buffers, simple attributes
    and mode, by path."""
    return {path: own_state(sub) for path, sub in m.named_modules(remove_duplicate=False)}


def own_state(m: nn.Module) -> dict:
    return {
        "training": m.training,
        "params": dict(m._parameters),
        "buffers": dict(m._buffers),
        "attrs": {k: v for k, v in vars(m).items() if _simple(k, v)},
    }


def apply_state(m: nn.Module, state: dict) -> None:
    """Load module_state's output into m, keeping parameter objects (an optimizer holds them)."""
    for path, entry in state.items():
        try:
            sub = m.get_submodule(path)
        except AttributeError:
            continue
        sub.training = bool(entry["training"])
        for k, v in entry["attrs"].items():
            if k in vars(sub) and _simple(k, v):
                vars(sub)[k] = v
        for k, t in entry["params"].items():
            current = sub._parameters.get(k)
            if t is None or current is None or current.device != t.device:
                sub._parameters[k] = t if t is None else nn.Parameter(t, t.requires_grad)
            else:
                with torch.no_grad():
                    current.data = t.data
                current.requires_grad_(t.requires_grad)
        for k, t in entry["buffers"].items():
            sub._buffers[k] = t


def _simple(key: str, value) -> bool:
    """A plain attribute kept in step; not the mirror's own links to the sandbox."""
    if key.startswith(("__", "_remote")) or key == "training":
        return False
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, SIMPLE) for v in value)
    return isinstance(value, SIMPLE)


def flat_tensors(obj) -> list[torch.Tensor]:
    """The tensors in obj, in the order both sides traverse it."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in flat_tensors(o)]
    return []


class GraderStop(BaseException):
    """Raised inside the learner's code when the grader ends a call (a check's hook failed);
    a BaseException, so that `except Exception` in the learner's loop does not swallow it."""


class _Server:
    def __init__(self, conn, shell, limits: Limits):
        self.conn, self.shell, self.limits = conn, shell, limits
        self.objects: dict[int, object] = {}
        self.sent: dict[int, nn.Module] = {}  # modules the grader sent, by its token
        self.graphs: dict[int, tuple] = {}  # calls whose gradients the grader may ask for
        self.call_ids = itertools.count(1)

    # -- references: objects cross the pipe by id, modules with a description --------------

    def _out_ref(self, obj):
        if isinstance(obj, nn.Module):
            self.objects[id(obj)] = obj
            return {"module": self._describe(obj), "id": id(obj)}
        if callable(obj):
            self.objects[id(obj)] = obj
            is_module = isinstance(obj, type) and issubclass(obj, nn.Module)
            return {"callable": id(obj), "trusted": qualified(obj), "module_class": is_module}
        return None

    def _describe(self, m: nn.Module, path: str = "", seen: dict | None = None) -> dict:
        """m's structure for the grader's mirror. A module or parameter met again (one layer
        under two names, tied weights) is sent as {"alias": where it was first met}."""
        seen = {} if seen is None else seen
        if id(m) in seen:
            return {"alias": seen[id(m)]}
        seen[id(m)] = path
        token = next((t for t, s in self.sent.items() if s is m), None)
        names = [c.__name__ for c in type(m).__mro__ if not qualified(c)]
        state = own_state(m)
        for k, p in m._parameters.items():
            if p is not None and id(p) in seen:
                state["params"][k] = {"alias": seen[id(p)]}
            elif p is not None:
                seen[id(p)] = f"{path}.{k}".lstrip(".")
        modules = {k: None if s is None else self._describe(s, f"{path}.{k}".lstrip("."), seen)
                   for k, s in m._modules.items()}  # fmt: skip
        return {
            "sent": token,
            "trusted": qualified(type(m)),
            "base": trusted_class(type(m)),
            "names": names[:-1] if names and names[-1] == "object" else names,
            "tensors": {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)},
            "nonpersistent": sorted(m._non_persistent_buffers_set),
            "modules": modules,
            **state,
        }

    def _in_ref(self, plain):
        if isinstance(plain, dict) and "id" in plain:
            obj = self.objects[int(plain["id"])]
            if isinstance(obj, nn.Module) and plain.get("state"):
                apply_state(obj, plain["state"])
                return obj.get_submodule(str(plain.get("path") or ""))
            return obj
        if isinstance(plain, dict) and "build" in plain:
            module = _build(plain["build"])
            self.sent[int(plain["token"])] = module
            return module
        if isinstance(plain, dict) and "trusted" in plain:
            return resolve(plain["trusted"])
        raise wire.WireError("unknown reference")

    # -- requests ---------------------------------------------------------------------------

    def answer(self, data: bytes) -> bytes:
        try:
            request = wire.decode(data, self._in_ref)
            op = request.get("op")
            if op == "exec":
                reply = self._exec(request["source"])
            elif op == "lookup":
                reply = self._lookup(request["name"])
            elif op == "call":
                reply = self._call(request)
            elif op == "backward":
                reply = self._backward(request)
            else:
                raise wire.WireError(f"unknown request {op!r}")
            return wire.encode(reply, self._out_ref)
        except BaseException as error:  # the learner's code raised, or its result cannot be sent
            return wire.encode({"error": _error(error)})

    def _exec(self, source: str) -> dict:
        out, err = _CappedText(self.limits.output), _CappedText(self.limits.output)
        sys.stdout, sys.stderr = out, err
        try:
            result = self.shell.run_cell(source, store_history=False)
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        error = result.error_before_exec or result.error_in_exec
        return {"stdout": out.text(), "stderr": err.text(),
                "error": _error(error) if error else None}  # fmt: skip

    def _lookup(self, name: str) -> dict:
        if name not in self.shell.user_ns:
            return {"missing": True}
        return {"value": self.shell.user_ns[name]}

    def _call(self, request: dict) -> dict:
        target = self.objects[int(request["ref"])]
        if request.get("path") is not None:
            apply_state(target, request["state"])
            target = target.get_submodule(request["path"])
        args, kwargs = request["args"], request["kwargs"]
        inputs = flat_tensors((args, kwargs))
        before = [t.detach().clone() if t.device.type != "meta" else None for t in inputs]
        torch.set_rng_state(request["rng"])
        hooks = [self._hook(obj, path) for obj, path in self._hooked(request)]
        try:
            with torch.set_grad_enabled(request["grad"]), _Modes(request["modes"]) as modes:
                value = target(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        root = self.objects[int(request["ref"])]
        leaf_params = []
        if isinstance(root, nn.Module) and request.get("path") is not None:
            leaf_params = [n for n, p in root.named_parameters() if p.requires_grad]
        leaves = [t for t in inputs if t.requires_grad]
        leaves += [root.get_parameter(n) for n in leaf_params]
        outputs = flat_tensors(value)
        call_id = next(self.call_ids)
        if leaves and any(t.requires_grad for t in outputs):
            self.graphs[call_id] = (outputs, leaves)
        changed = {str(i): t.detach() for i, (t, b) in enumerate(zip(inputs, before, strict=True))
                   if b is not None and not torch.equal(t.detach(), b)}  # fmt: skip
        states = {str(i): module_state(self.objects[i]) for i in request.get("modules", [])}
        return {"value": value, "call_id": call_id, "leaf_params": leaf_params,
                "grad_outputs": [t.requires_grad for t in outputs], "changed": changed,
                "states": states, "rng": torch.get_rng_state(), "called": modes.called}  # fmt: skip

    def _hooked(self, request):
        for plain in request.get("hooks", []):
            obj = self.objects.get(int(plain["id"]))
            if isinstance(obj, nn.Module):
                yield obj, str(plain["path"])

    def _hook(self, root: nn.Module, path: str):
        """Let the grader's forward pre-hooks on this module see each call (a budget)."""

        def ask(module, args, kwargs):
            message = {"hook": id(root), "path": path, "training": module.training,
                       "args": list(args), "kwargs": kwargs}  # fmt: skip
            self.conn.send_bytes(wire.encode(message, self._out_ref))
            reply = wire.decode(self.conn.recv_bytes())
            if reply.get("stop"):
                raise GraderStop("the grader ended this call")

        return root.get_submodule(path).register_forward_pre_hook(ask, with_kwargs=True)

    def _backward(self, request: dict) -> dict:
        # autograd frees a graph once it is used: so is its entry, with what it holds alive
        outputs, leaves = self.graphs.pop(int(request["call_id"]))
        pairs = [(o, g) for o, g in zip(outputs, request["grads"], strict=True)
                 if g is not None and o.requires_grad]  # fmt: skip
        if not pairs or not leaves:
            return {"grads": [None] * len(leaves)}
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                    allow_unused=True)  # fmt: skip
        return {"grads": list(grads)}


class _Modes:
    """The grader's instrumentation, switched on in here for a call: no CPU tensors beside meta
    ones, and which forbidden library functions and course references the call ran. The
    learner's code could switch these off; what they catch is honest mistakes, and the verdict
    on the outputs never depends on them."""

    def __init__(self, modes: dict):
        from ..checks.core import LibraryCalls, NoCpuTensors, ReferenceCalls

        library = [f for f in map(resolve, modes.get("library", [])) if f is not None]
        references = [f for f in map(resolve, modes.get("reference", [])) if f is not None]
        self.contexts = [LibraryCalls(*library), ReferenceCalls(references)]
        if modes.get("no_cpu"):
            self.contexts.append(NoCpuTensors())
        self.called = {"library": [], "reference": []}

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()
        return self

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)
        self.called = {"library": self.contexts[0].called, "reference": self.contexts[1].called}


def _build(tree: dict) -> nn.Module:
    """A module of trusted classes, rebuilt from its description (a check's fixed sublayer)."""
    cls = resolve(tree["trusted"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise wire.WireError("only modules of trusted classes can be sent")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in tree["attrs"].items():
        vars(m)[k] = v
    for k, sub in tree["modules"].items():
        m._modules[k] = None if sub is None else _build(sub)
    apply_state(m, {"": tree})
    return m


def _error(error: BaseException) -> dict:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"type": type(error).__name__, "mro": [c.__name__ for c in type(error).__mro__],
            "message": str(error)[:2000], "traceback": lines[-20:]}  # fmt: skip

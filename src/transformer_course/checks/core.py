"""The check engine shared by notebook tests, the course's own tests and the grader.

An exercise's check module lists `Case`s (seeded, self-contained functions that run a
learner's implementation and raise `CheckFailed` when it disagrees with a trusted
reference) and a catalogue of `Mistake`s (wrong implementations learners really write).
`run_cases` turns them into a `Report` of plain data; when an output is wrong, the engine
reruns every catalogued mistake on the same inputs and names the one that reproduces it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FunctionType
from typing import Any

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PASSED = "passed"
FAILED = "failed"
NOT_ATTEMPTED = "not attempted"
SKIPPED = "skipped"


@dataclass(frozen=True)
class Mistake:
    id: str  # short name, used in reports and in the course's tests
    explanation: str  # what went wrong, in plain words, for the learner
    impl: Any  # a wrong implementation with the exercise's interface


@dataclass(frozen=True)
class Case:
    name: str  # what the case checks, as the learner reads it
    suite: str  # "visible" (in the learner's notebook) or "hidden" (added by the grader)
    run: Callable[[Any, bool], None]  # run(impl, reveal): raises CheckFailed on a wrong answer
    device: str = "cpu"  # cases on an absent device are skipped


class CheckFailed(AssertionError):
    """A case's verdict: the learner's answer is wrong, and possibly which mistake it is."""

    def __init__(self, message: str, mistake: Mistake | None = None):
        super().__init__(message)
        self.message = message
        self.mistake = mistake


@dataclass
class CaseResult:
    case: str
    status: str  # PASSED, FAILED, NOT_ATTEMPTED or SKIPPED
    message: str = ""
    mistake: str | None = None  # id of the catalogued mistake the answer matches
    explanation: str = ""


@dataclass
class Report:
    exercise: str
    suite: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def not_attempted(self) -> bool:
        return any(r.status == NOT_ATTEMPTED for r in self.results)

    @property
    def passed(self) -> bool:
        statuses = {r.status for r in self.results}
        return PASSED in statuses and statuses <= {PASSED, SKIPPED}

    @property
    def mistakes(self) -> list[str]:
        return list(dict.fromkeys(r.mistake for r in self.results if r.mistake))

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        ran = [r for r in self.results if r.status != SKIPPED]
        n_passed = sum(r.status == PASSED for r in ran)
        lines = [f"{self.exercise}: {n_passed} of {len(ran)} {self.suite} checks passed"]
        if self.not_attempted:
            lines[0] += " (not attempted yet: your code raises NotImplementedError)"
        marks = {PASSED: "✓", FAILED: "✗", NOT_ATTEMPTED: "…", SKIPPED: "-"}
        for r in self.results:
            suffix = " (skipped: no such device here)" if r.status == SKIPPED else ""
            lines.append(f"  {marks[r.status]} {r.case}{suffix}")
            if r.message:
                lines.extend("      " + line for line in r.message.splitlines())
            if r.mistake:
                lines.append(f"      Likely mistake [{r.mistake}]: {r.explanation}")
        return "\n".join(lines)

    def raise_for_status(self) -> Report:
        """Return self when every case passed; raise with the whole report otherwise."""
        if self.not_attempted:
            raise NotImplementedError(str(self))
        if not self.passed:
            raise AssertionError(str(self))
        return self


USES_REFERENCE = Mistake(
    "uses_reference",
    "the answer runs the course's own implementation from transformer_course.model (imported, "
    "wrapped or subclassed). Earlier chapters' components are yours to import; this "
    "exercise's is yours to write.",
    None,
)


@dataclass(frozen=True)
class Exercise:
    id: str  # the exercise id: also the solution cell's grade_id and the stub's message
    cases: tuple[Case, ...]
    mistakes: tuple[Mistake, ...]  # the catalogue, in the order diagnosis tries it
    reference: Any = None  # the course's answer, from transformer_course.model
    also_forbidden: tuple = ()  # other course components an answer must not run

    def report(self, impl: Any, suite: str = "visible", reference_allowed: bool = False):
        """Run one suite. An answer that runs the course's reference code earns nothing;
        only the course's own tests of that reference set reference_allowed."""
        forbidden = () if reference_allowed else (self.reference, *self.also_forbidden)
        with ReferenceCalls(forbidden) as calls:
            report = run_cases(self.id, self.cases, impl, suite)
        if calls.called:
            report.results.append(
                CaseResult(
                    "is your own code, not the course's reference",
                    FAILED,
                    f"Your answer runs transformer_course.model's {calls.called[0]}.",
                    USES_REFERENCE.id,
                    USES_REFERENCE.explanation,
                )
            )
        return report

    def check(self, impl: Any, suite: str = "visible") -> None:
        """What a notebook's test cell calls: print the report, or raise with it."""
        print(self.report(impl, suite).raise_for_status())


class ReferenceCalls:
    """Records calls of the given functions and classes' methods, by their code objects, so
    that an alias, a wrapper or a subclass is seen as well as the object itself."""

    def __init__(self, objects: Sequence[Any]):
        self.codes = {}
        # 'module:qualname' of each object, for a grading sandbox to watch for them too
        self.names = [f"{o.__module__}:{o.__qualname__}" for o in _flatten(objects)]
        for obj in _flatten(objects):
            functions = vars(obj).values() if isinstance(obj, type) else [obj]
            for f in functions:
                if isinstance(f, FunctionType):
                    self.codes[f.__code__] = f.__qualname__
        self.called: list[str] = []

    def _profile(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self.called.append(self.codes[frame.f_code])

    def __enter__(self):
        if self.codes:
            self.previous = sys.getprofile()
            sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc):
        if self.codes:
            sys.setprofile(self.previous)


def _flatten(objects):
    for obj in objects:
        if isinstance(obj, tuple):
            yield from _flatten(obj)
        elif obj is not None:
            yield obj


def available_devices() -> list[str]:
    return ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


def run_cases(exercise: str, cases: Sequence[Case], impl: Any, suite: str) -> Report:
    """Run the cases of one suite and collect plain-data results; never raises."""
    report = Report(exercise, suite)
    reveal = suite == "visible"
    devices = available_devices()
    for case in cases:
        if case.suite != suite:
            continue
        if case.device not in devices:
            report.results.append(CaseResult(case.name, SKIPPED))
            continue
        try:
            case.run(impl, reveal)
        except NotImplementedError:
            report.results.append(CaseResult(case.name, NOT_ATTEMPTED))
        except CheckFailed as failure:
            m = failure.mistake
            report.results.append(
                CaseResult(
                    case.name,
                    FAILED,
                    failure.message,
                    m.id if m else None,
                    m.explanation if m else "",
                )
            )
        except Exception as error:  # the learner's code crashed: report it, run the rest
            report.results.append(
                CaseResult(case.name, FAILED, f"Your code raised {type(error).__name__}: {error}")
            )
        else:
            report.results.append(CaseResult(case.name, PASSED))
    return report


def describe(t: Any, reveal: bool = True, n_values: int = 4) -> str:
    """'shape (2, 3), torch.float32, values [0.1, ...]' or a short word for non-tensors."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} (expected a tensor)"
    text = f"shape {tuple(t.shape)}, {t.dtype}"
    if t.device.type != "cpu":
        text += f", on {t.device.type}"
    if reveal and t.device.type != "meta" and t.numel():
        values = t.detach().flatten()[:n_values].double().cpu().tolist()
        more = ", ..." if t.numel() > n_values else ""
        text += ", values [" + ", ".join(f"{x:.4g}" for x in values) + more + "]"
    return text


def _close(a: Any, b: torch.Tensor, atol: float, rtol: float) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return bool(torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True))


def diagnose(
    yours: Any,
    rerun: Callable[[Any], Any],
    mistakes: Sequence[Mistake],
    atol: float,
    rtol: float,
) -> Mistake | None:
    """The first catalogued mistake whose output, on the same inputs, matches the learner's."""
    for mistake in mistakes:
        try:
            theirs = rerun(mistake.impl)
        except Exception:
            continue
        if _close(yours, theirs, atol, rtol):
            return mistake
    return None


def attempt(
    rerun: Callable[[Any], Any], impl: Any, mistakes: Sequence[Mistake], context: str = ""
) -> Any:
    """rerun(impl); a crash becomes a CheckFailed naming the mistake that fails the same way."""
    try:
        return rerun(impl)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as error:
        where = f"\n  ({context})" if context else ""
        raise CheckFailed(
            f"Your code raised {type(error).__name__}: {error}{where}",
            diagnose_error(error, rerun, mistakes),
        ) from None


def diagnose_error(
    error: Exception, rerun: Callable[[Any], Any], mistakes: Sequence[Mistake]
) -> Mistake | None:
    """The first catalogued mistake that fails on the same inputs with the same exception type."""
    for mistake in mistakes:
        try:
            rerun(mistake.impl)
        except Exception as theirs:
            if type(theirs) is type(error):
                return mistake
    return None


def expect_close(
    what: str,
    yours: Any,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    reveal: bool,
    rerun: Callable[[Any], Any] | None = None,
    mistakes: Sequence[Mistake] = (),
) -> None:
    """Raise CheckFailed, naming the matching mistake, unless `yours` matches `expected`."""
    if isinstance(yours, torch.Tensor) and yours.dtype != expected.dtype:
        raise CheckFailed(
            f"{what}: yours has dtype {yours.dtype}, expected {expected.dtype}. "
            "Keep the input's dtype: create new tensors with dtype=x.dtype."
        )
    if _close(yours, expected, atol, rtol):
        return
    lines = [f"{what}:", f"  yours:    {describe(yours, reveal)}"]
    lines.append(f"  expected: {describe(expected, reveal)}")
    if isinstance(yours, torch.Tensor) and yours.shape == expected.shape and yours.numel():
        diff = (yours.detach().double().cpu() - expected.detach().double().cpu()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        lines.append(f"  largest difference {diff.max().item():.3g} at index {worst}")
    mistake = diagnose(yours, rerun, mistakes, atol, rtol) if rerun else None
    raise CheckFailed("\n".join(lines), mistake)


def expect_shape(what: str, yours: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(yours, torch.Tensor):
        raise CheckFailed(f"{what}: yours is a {type(yours).__name__}, expected a tensor.")
    if tuple(yours.shape) != tuple(shape):
        raise CheckFailed(f"{what}: yours has shape {tuple(yours.shape)}, expected {tuple(shape)}.")
    if yours.dtype != dtype:
        raise CheckFailed(f"{what}: yours has dtype {yours.dtype}, expected {dtype}.")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Seeded normal samples, drawn on the CPU so every device sees the same numbers."""
    t = torch.randn(*shape, generator=seeded(seed), dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device)


def load_linears(module: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """Copy (weight, bias) into the module's nn.Linear layers of those names, checking each
    exists with the right shape and bias; the module must already have the weights' dtype."""
    for name, (w, b) in weights.items():
        layer = getattr(module, name, None)
        if not isinstance(layer, nn.Linear):
            raise CheckFailed(f"{name} should be an nn.Linear, found {type(layer).__name__}.")
        n_out, n_in = w.shape
        if tuple(layer.weight.shape) != (n_out, n_in) or (layer.bias is not None) != (
            b is not None
        ):
            raise CheckFailed(
                f"{name} should be nn.Linear({n_in}, {n_out}, bias={b is not None}); found "
                f"weight {tuple(layer.weight.shape)}, bias {layer.bias is not None}."
            )
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)


# The ATen operators behind each forbidden function, by the function's name: what the learner
# reaches by calling torch.ops.aten.<operator> instead of the function itself.
OPERATORS = {
    "scaled_dot_product_attention": ("scaled_dot_product",),
    "multi_head_attention_forward": ("multi_head_attention", "scaled_dot_product"),
    "layer_norm": ("layer_norm",),
    "rms_norm": ("rms_norm",),
    "unfold": ("im2col",),
}


class LibraryCalls(TorchFunctionMode):
    """Records calls of the given PyTorch functions, however the learner reached them
    (an alias, getattr, a module such as nn.MultiheadAttention that calls them, or the ATen
    operator underneath through torch.ops)."""

    def __init__(self, *forbidden):
        super().__init__()
        self.forbidden = forbidden
        self.called = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self._forbidden(func)
        if name:
            self.called.append(name)
        return func(*args, **(kwargs or {}))

    def _forbidden(self, func) -> str | None:
        if func in self.forbidden:
            return getattr(func, "__name__", str(func))
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            for f in self.forbidden:
                if any(op in str(func) for op in OPERATORS.get(f.__name__, ())):
                    return f.__name__
        return None


def expect_device(what: str, yours: Any, device: torch.device | str) -> None:
    """A result must live where its inputs do."""
    device = torch.device(device)
    if isinstance(yours, torch.Tensor) and yours.device.type != device.type:
        raise CheckFailed(f"{what} is on {yours.device}, the input on {device}.")


def expect_on_meta(
    what: str, yours: Any, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> None:
    """A meta-device case's result: the right shape and dtype, and on meta like its inputs
    (a result computed from a CPU tensor made inside would land on the CPU)."""
    expect_shape(f"{what} on meta", yours, shape, dtype)
    expect_device(f"Your {what}", yours, "meta")


def expect_value_error(call: Callable[[], Any], what: str, mistake: Mistake | None) -> None:
    """call() must raise ValueError; anything else fails, naming `mistake`."""
    try:
        result = call()
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:
        raise CheckFailed(
            f"{what}: your code raised {type(error).__name__}: {error}\n  expected a ValueError "
            "whose message says what is wrong.",
            mistake,
        ) from None
    raise CheckFailed(
        f"{what}: yours returned a {type(result).__name__}, expected a ValueError.", mistake
    )


class CpuTensorUsed(RuntimeError):
    """On the meta device: an operation was handed a CPU tensor besides meta ones."""


class FirstStep(BaseException):
    """A training loop on meta reached its first optimizer step. A BaseException, so that a
    loop's `except Exception` does not swallow it."""


def _stop_on_meta(optimizer, args, kwargs):
    if any(p.is_meta for group in optimizer.param_groups for p in group["params"]):
        raise FirstStep("the loop reached its first optimizer step")


class NoCpuTensors(TorchDispatchMode):
    """Raises CpuTensorUsed when a tensor made on the CPU meets a meta one: what fails on a GPU.
    Some such mixes run on meta without it (an embedding looked up with CPU positions). CPU
    scalars and indices are let through, since CUDA accepts them.

    A training loop is judged up to its first optimizer step, where FirstStep stops it: by then
    a batch went through the model, the loss and backward. A step on meta would update nothing,
    and fused optimizers refuse meta parameters. Meta tensors hold no values: a scalar read
    from one (loss.item()) is 0."""

    def __enter__(self):
        self._step_hook = register_optimizer_step_pre_hook(_stop_on_meta)
        return super().__enter__()

    def __exit__(self, *exc):
        self._step_hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return False if args[0].dtype == torch.bool else 0
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if cpu and func is not torch.ops.aten.index.Tensor and any(t.is_meta for t in tensors):
            raise CpuTensorUsed(
                f"{func.overloadpacket.__name__} got a tensor of shape {tuple(cpu[0].shape)} on "
                "the CPU besides the input on the meta device: create tensors with "
                "device=x.device, or keep them in a registered buffer."
            )
        return func(*args, **(kwargs or {}))


def on_meta(call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """call, run under NoCpuTensors: for the meta-device cases and their diagnosis."""

    def rerun(impl):
        with NoCpuTensors():
            return call(impl)

    return rerun


def forked_rng(device: torch.device | str):
    """The global random state of the CPU, and of `device` when it is a GPU, put back on exit:
    a check seeds a learner's training loop without changing the learner's own random stream."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    index = torch.cuda.current_device() if device.index is None else device.index
    return torch.random.fork_rng(devices=[index])


# How PyTorch words an operation given tensors on two devices: on CUDA, then on meta.
MIXED_DEVICES = ("Expected all tensors to be on the same device", "is not on the expected device")


@contextmanager
def devices_mixed_up(device: torch.device | str, mistake: Mistake) -> Iterator[None]:
    """Around a learner's code run with its model on `device`: PyTorch's error for tensors on
    two devices, or NoCpuTensors', becomes a CheckFailed naming `mistake`; any other error
    passes through."""
    try:
        yield
    except RuntimeError as error:
        mixed = isinstance(error, CpuTensorUsed) or any(w in str(error) for w in MIXED_DEVICES)
        if not mixed:
            raise
        raise CheckFailed(
            f"With the model on {device}, your code raised RuntimeError: {error}", mistake
        ) from None


def first_step_on_meta(train: Callable[[], Any], mistake: Mistake) -> None:
    """Run a training loop whose model is on meta, up to its first optimizer step: a CPU
    tensor meeting the model's on the way is `mistake`."""
    try:
        with NoCpuTensors(), devices_mixed_up("meta", mistake):
            train()
    except FirstStep:
        pass

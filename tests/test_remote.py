"""The checks give the same verdicts when the learner's code runs in a sandbox: every
catalogued mistake still fails and is named, every correct variant still passes, with the
outputs, gradients, random numbers and instrumentation crossing the process boundary."""

import importlib
import os
import tempfile
from pathlib import Path

import pytest

from transformer_course.checks import EXERCISES
from transformer_course.grading.confine import FIRST_UID, Limits
from transformer_course.grading.remote import Sandbox

from .proofs import SUITES, only_on

CHAPTERS = ["test_01_self_attention", "test_02_multi_head_attention",
            "test_03_positional_encoding", "test_04_feed_forward",
            "test_05_norms_and_residuals", "test_06_transformer_block",
            "test_07_vision_transformer"]  # fmt: skip
SLOW = {"train_sorting_model", "train_vision_transformer"}  # minutes per catalogue: see below


def _correct_variants():
    for chapter in CHAPTERS:
        module = importlib.import_module(f"tests.{chapter}")
        for pair in module.CORRECT:
            exercise, impl = pair if isinstance(pair, tuple) else (module.FEED_FORWARD, pair)
            if exercise.id not in SLOW:
                where = f"tests.{chapter}.{impl.__name__}"
                yield pytest.param(exercise.id, where, id=f"{exercise.id}-{impl.__name__}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(Limits(workdir=str(tmp_path_factory.mktemp("sandbox"))))
    box.exec("from transformer_course.checks import EXERCISES")
    yield box
    box.kill()


def _remote(box, source):
    reply = box.exec(f"impl = {source}")
    assert reply["error"] is None, reply["error"]
    return box.lookup("impl")


CATALOGUE = [pytest.param(e.id, i, m.id, id=f"{e.id}-{m.id}")
             for e in EXERCISES.values() if e.id not in SLOW
             for i, m in enumerate(e.mistakes)]  # fmt: skip


@pytest.mark.parametrize("exercise, index, mistake", CATALOGUE)
def test_each_mistake_is_named_through_the_sandbox(sandbox, exercise, index, mistake):
    impl = _remote(sandbox, f"EXERCISES[{exercise!r}].mistakes[{index}].impl")
    found = [EXERCISES[exercise].report(impl, suite) for suite in SUITES]
    assert not all(r.passed for r in found), f"{mistake} passed every check"
    assert mistake in [m for r in found for m in r.mistakes], [str(r) for r in found]


@pytest.mark.parametrize("exercise", [e for e in EXERCISES if e not in SLOW])
def test_each_reference_passes_through_the_sandbox(sandbox, exercise):
    impl = _remote(sandbox, f"EXERCISES[{exercise!r}].reference")
    for suite in SUITES:
        report = EXERCISES[exercise].report(impl, suite, reference_allowed=True)
        assert report.passed, str(report)


@pytest.mark.parametrize("exercise, where", list(_correct_variants()))
def test_each_correct_variant_passes_through_the_sandbox(sandbox, exercise, where):
    module, _, name = where.rpartition(".")
    impl = _remote(sandbox, f"__import__({module!r}, fromlist=['_']).{name}")
    for suite in SUITES:
        report = EXERCISES[exercise].report(impl, suite)
        assert report.passed, str(report)


TRAINING = [
    ("train_sorting_model", "tests.test_06_transformer_block.SinusoidalSortingModel",
     "batches_off_the_model_device"),
    ("train_vision_transformer", "tests.test_07_vision_transformer.TinyViT",
     "images_off_the_model_device"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("exercise, model, off_device", TRAINING, ids=[e for e, *_ in TRAINING])
def test_training_is_judged_here_and_its_budget_kept_across_the_boundary(
    sandbox, exercise, model, off_device
):
    correct_loop = "train_with_adam_constant_lr"  # each chapter's test has one by this name
    """The learner's loop trains in the sandbox; the grader scores the trained weights itself.
    The budget is counted by the check's own hook, which the sandbox calls back for each batch.
    The meta case stops the loop at its first optimizer step in the sandbox too."""
    on_meta = only_on(EXERCISES[exercise], "meta")
    reference = _remote(sandbox, f"EXERCISES[{exercise!r}].reference")
    report = EXERCISES[exercise].report(reference, "visible", reference_allowed=True)
    assert report.passed, str(report)
    assert on_meta.report(reference, "hidden", reference_allowed=True).passed
    module, _, name = model.rpartition(".")
    correct = _remote(sandbox, f"(__import__({module!r}, fromlist=['_']).{correct_loop}, "
                               f"__import__({module!r}, fromlist=['_']).{name})")  # fmt: skip
    report = on_meta.report(correct, "hidden")
    assert report.passed, str(report)
    for i, mistake in enumerate(EXERCISES[exercise].mistakes):
        impl = _remote(sandbox, f"(EXERCISES[{exercise!r}].mistakes[{i}].impl, "
                                f"__import__({module!r}, fromlist=['_']).{name})")  # fmt: skip
        if mistake.id == off_device:  # right on a CPU: the meta case shows it
            report = on_meta.report(impl, "hidden")
        else:
            report = EXERCISES[exercise].report(impl, "visible")
        assert not report.passed and report.mistakes == [mistake.id], str(report)


def test_the_sandbox_is_confined_as_far_as_the_platform_allows():
    """As root (CI): every restriction holds, and a folder everyone may read is hidden all the
    same. Elsewhere the sandbox says which restrictions held."""
    with tempfile.TemporaryDirectory() as open_folder, tempfile.TemporaryDirectory() as work:
        os.chmod(open_folder, 0o755)  # readable by any user: only hiding can keep it out
        (Path(open_folder) / "answers.txt").write_text("42")
        box = Sandbox(Limits(workdir=work, hide=(open_folder,)))
        try:
            reply = box.exec(f"import os\nprint(os.listdir({open_folder!r}), os.getuid())")
        finally:
            box.kill()
    assert reply["error"] is None, reply["error"]
    listed, uid = reply["stdout"].rsplit(" ", 1)
    if os.geteuid() == 0:
        memory = [] if os.path.exists("/dev/nvidiactl") else ["memory limit"]  # off beside CUDA
        assert box.enforced == ["no network", "private folders hidden", "unprivileged user",
                                *memory, "process and file-size limits"]  # fmt: skip
        assert int(uid) >= FIRST_UID
    if "private folders hidden" in box.enforced:
        assert listed == "[]"
    else:
        assert listed == "['answers.txt']"  # the test can tell the two apart

"""Shared fixtures: small synthetic CIFAR-10 in the real on-disk format, so a fresh clone passes; small models; a
workspace in a temporary folder. Every test in a tests/test_course_*.py file is marked `course`."""

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("MPLBACKEND", "Agg")
# One torch thread in the test process (TEST_TORCH_THREADS to change it): on a small shared machine (2 cores, other
# work) one thread per core oversubscribes and stalls; the fast tests took 4x as long. Their models are tiny anyway.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def fixed_answer(exercise):
    """A hashed exercise's answer ("check: N" in teacher/answers), or None in the class's copy (no teacher/)."""
    path = ROOT / "teacher" / "answers" / f"{exercise[:2]}.md"
    if not path.exists():
        return None
    found = re.search(rf"^## {re.escape(exercise)}\n.*?check: (-?[\d.]+)", path.read_text(), re.M | re.S)
    value = float(found[1].rstrip("."))
    return int(value) if value.is_integer() else value


def write_fake_cifar(root, n_train=200, n_test=50, seed=0):
    """Write CIFAR-10-format batch files with class-dependent colours (learnable) under root."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(123).integers(0, 256, (10, 3))  # a colour per class
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        base = palette[labels]
        images = np.clip(base[:, None, None, :] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return images, labels

    def dump(name, images, labels):
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)

    images, labels = batch(n_train)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        dump(f"data_batch_{i + 1}", images[part], labels[part])
    dump("test_batch", *batch(n_test))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog",
                                      b"horse", b"ship", b"truck"]}, f)
    return Path(root)


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A folder holding synthetic CIFAR-10 (200 train, 50 test images)."""
    return write_fake_cifar(tmp_path_factory.mktemp("fake_cifar"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Real images (../shared/data/cifar10-mini) where they exist, synthetic ones otherwise."""
    mini = SHARED_DATA / "cifar10-mini"
    if (mini / "cifar-10-batches-py" / "test_batch").exists():
        return mini
    return write_fake_cifar(tmp_path_factory.mktemp("fake_cifar_nb"), n_train=1000, n_test=200)


def pytest_collection_modifyitems(config, items):
    """The tests of the course package (tests/test_course_*.py) and of the teacher's table built on its hand-ins
    (tests/test_class_results*.py) carry the marker `course`: `-m course` runs them. Every test that reads the
    student's run (the notebooks executed as a student runs them) is `slow`."""
    for item in items:
        if item.path.name.startswith(("test_course_", "test_class_results")):
            item.add_marker(pytest.mark.course)
        if {"student_run", "handins"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_workspace(tmp_path, data_dir=None, start_over=False, **variables):
    """course.start on a notebook whose globals are `variables`, its work in tmp_path/outputs and tmp_path/images."""
    import course

    return course.start(variables, data_dir=data_dir or tmp_path / "data", device="cpu", start_over=start_over,
                        outputs=tmp_path / "outputs", images=tmp_path / "images")


def _files(*folders):
    return {p: p.stat().st_mtime_ns for f in folders for p in Path(f).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def student_run(tmp_path_factory, data_dir):
    """The series as a student runs it on Colab (faked; /content and Drive in a temporary folder), each notebook in
    a fresh kernel: 01-07 with QUICK = True, 03 again (a new runtime), then a real 03 on the same Drive (QUICK =
    False, one short epoch), with a name and three answers typed in. Shared by the tests that read its outputs."""
    from student import fake_colab, run_as_student

    root = tmp_path_factory.mktemp("student")
    env, content = fake_colab(root, data_dir)  # CIFAR-10 in /content/data, where a Colab runtime keeps it
    checkout = _files(ROOT / "outputs", ROOT / "images")
    run = {"env": env, "data": data_dir, "workspace": content / "drive" / "MyDrive" / "resnet-cifar10-course",
           "notebooks": {}}
    for number in ("01", "02", "03", "04", "05", "06", "07"):
        run["notebooks"][number] = run_as_student(number, env, out=root / f"{number}.ipynb", QUICK="True")
    run["quick_03_again"] = run_as_student("03", env, out=root / "03_again.ipynb", QUICK="True")
    run["drive_before_real_run"] = sorted(p for p in run["workspace"].rglob("*") if p.is_file())
    run["checkout_untouched"] = _files(ROOT / "outputs", ROOT / "images") == checkout
    run["real_03"] = run_as_student(
        "03", env, out=root / "03_real.ipynb", SUBSET="500", EPOCHS="1", BATCH_SIZE="32",
        N_SEEDS="1", answers={"STUDENT": '"Bob"', "ANSWER_03_1": str(fixed_answer("03.1") or 1),
                              "ANSWER_03_2": "(1, 0)", "ANSWER_03_3": '"one step lowered the loss"'})
    return run


class Tiny(nn.Module):
    """A small CNN that trains in seconds on the CPU (`scale` multiplies its logits)."""

    def __init__(self, width=16, scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class Frozen(nn.Module):
    """Constant predictions and zero gradients: every metric stays flat from epoch to epoch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("logits", torch.arange(10.0))

    def forward(self, x):
        return self.logits.expand(len(x), 10) + 0 * self.w * x.mean()


class NanAfter(Tiny):
    """Trains normally for `good` training batches; after that its logits are NaN in training or in eval mode."""

    def __init__(self, good, in_eval=False, **kwargs):
        super().__init__(**kwargs)
        self.good, self.in_eval, self.steps = good, in_eval, 0

    def forward(self, x):
        self.steps += self.training
        out = super().forward(x)
        return out * float("nan") if self.training != self.in_eval and self.steps > self.good else out


class NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward: the step poisons the weights, the loss that step was fine."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class PoisonedStep(Tiny):
    """A Tiny whose every training step poisons the weights with NaN (the step's own loss is finite)."""

    def forward(self, x):
        return NanGrad.apply(super().forward(x)) if self.training else super().forward(x)

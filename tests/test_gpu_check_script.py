"""scripts/gpu_check.sh and scripts/gpu_check.py, the one-shot device check, checked without a
device: shell syntax, the step runner and report on stand-in steps, the short solver, and that
every real step names files that exist and fits the 8-minute budget."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module           # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    done = subprocess.run([bash, "-n", str(ROOT / "scripts" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_steps_fit_the_budget_and_name_existing_files():
    check = _module()
    assert sum(s.seconds for s in check.STEPS) <= check.TOTAL_SECONDS <= 540   # run: 600 s
    names = [s.name for s in check.STEPS]
    assert {"pytest_gpu", "demo", "slices_n2", "mpi_2_ranks"} <= set(names)
    assert any(n.startswith("bench") for n in names)
    for step in check.STEPS:
        for word in step.command:
            if str(word).endswith((".py", ".prototxt")) and "/" in str(word) \
                    and not str(word).startswith("demo/"):
                assert (ROOT / word).is_file(), (step.name, word)


def test_runner_reports_ok_failure_and_timeout(tmp_path, monkeypatch):
    check = _module()
    py = sys.executable
    monkeypatch.setattr(check, "STEPS", [
        check.Step("fine", [py, "-c", "print('all good')"], 20, "prints"),
        check.Step("broken", [py, "-c", "import sys; print('bad'); sys.exit(3)"], 20, "fails"),
        check.Step("slow", [py, "-c", "import time; time.sleep(30)"], 1, "hangs"),
    ])
    assert check.main([str(tmp_path)]) == 1
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| fine | ok |" in text and "| broken | failed (exit 3) |" in text
    assert "| slow | timed out after 1 s |" in text and "all good" in text
    assert (tmp_path / "broken.log").read_text().strip() == "bad"


def test_short_solver_is_a_valid_gpu_solver(tmp_path):
    from owlnet.proto import caffe_pb2
    check = _module()
    target = tmp_path / "s.prototxt"
    check.write_short_solver(ROOT / "solvers" / "lenet_solver.prototxt", target, 120)
    solver = text_format.Parse(target.read_text(), caffe_pb2.SolverParameter())
    assert solver.max_iter == 120 and solver.solver_mode == caffe_pb2.SolverParameter.GPU
    assert solver.net == "models/lenet/train_test.prototxt" and solver.snapshot == 0
    assert solver.base_lr == pytest.approx(0.01) and solver.random_seed == 1701

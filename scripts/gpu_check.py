"""The one-shot device check (issue 10), run by scripts/gpu_check.sh on a lent GPU machine.

Runs each step below in a subprocess under its own time limit (all of them within
``TOTAL_SECONDS``), keeps every step's full output in ``OUT/<step>.log`` and writes one report,
``OUT/gpu_check.md``: per step the command, exit status, seconds and the output's last lines,
then the device and package versions. A step that fails or times out does not stop the next.

    python3 scripts/gpu_check.py OUT_FOLDER [--only STEP ...]

slices_n2 and mpi_2_ranks train on the LMDBs and mean file the demo step writes: a fresh
machine needs the demo step before them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOTAL_SECONDS = 540                 # under 9 minutes with the wheel install before it
SHORT_SOLVER = "demo/gpu_check_solver.prototxt"
MPI = ["mpiexec", "--allow-run-as-root", "--oversubscribe", "-n", "2"]


@dataclass
class Step:
    name: str
    command: list
    seconds: int
    what: str


STEPS = [
    Step("environment", ["bash", "-c", "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,"
                         "memory.total --format=csv; " + PY + " -c 'import cupy, numpy; "
                         "print(\"cupy\", cupy.__version__, \"numpy\", numpy.__version__); "
                         "import cudnn; print(\"cudnn frontend\", cudnn.__version__, "
                         "\"backend\", cudnn.backend_version())'"], 15,
         "card, driver, CuPy, cuDNN versions"),
    Step("pytest_gpu", [PY, "-m", "pytest", "-m", "gpu", "-q", "--maxfail=30", "--tb=short",
                        "-rfE", "-p", "no:cacheprovider", "tests"], 150,
         "every test marked gpu (layers GPU vs CPU, cuDNN graphs)"),
    Step("pytest_gpu_on_cpu_checks", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_gpu_sources.py", "tests/test_gpu_conv.py",
                                      "tests/test_gpu_kernels.py", "tests/test_gpu_blob.py",
                                      "tests/test_captured_step.py", "tests/test_cublas.py"], 30,
         "the no-GPU checks (NVRTC, C harness, fakes) on the device machine"),
    Step("demo", [PY, "scripts/mnist_demo.py"], 80,
         "`make demo` on the GPU: LeNet on MNIST, 2,000 iterations, test accuracy"),
    Step("slices_n2", [PY, "tools/net_trainer.py", SHORT_SOLVER, "--gpu", "0", "-n", "2"],
         40, "two slices in one process on the one GPU (-n 2)"),
    Step("mpi_2_ranks", MPI + [PY, "tools/net_trainer.py", SHORT_SOLVER, "--device", "gpu"], 45,
         "two MPI ranks sharing the one GPU"),
    Step("bench_gpu_vs_torch", [PY, "bench/gpu_vs_torch.py", "--models",
                                "resnet20,alexnet_nogroup,caffenet,resnet56", "--math",
                                "fp32,tf32", "--iterations", "10", "--budget", "140"], 150,
         "owlnet Solver.step vs PyTorch eager and CUDA graph, batch 128 (what fits in 140 s; "
         "the whole table: bench/gpu_vs_torch.py --budget 540 on its own)"),
    Step("data_feed", [PY, "bench/data_pipeline.py", "--feed", "--device", "gpu", "--images",
                       "1024", "--batch", "128", "--batches", "24"], 30,
         "JPEG Datum LMDB -> uint8 batches in device memory, images/s (target 7,500)"),
]


def write_short_solver(source: Path, target: Path, iterations: int = 300) -> None:
    """The demo's LeNet solver cut to ``iterations``, no snapshots, solver_mode GPU."""
    keep = ("net:", "base_lr:", "momentum:", "weight_decay:", "lr_policy:", "gamma:", "power:",
            "random_seed:")
    lines = [line for line in source.read_text().splitlines()
             if line.split("#")[0].strip().startswith(keep)]
    lines += [f"max_iter: {iterations}", "display: 100", "test_iter: 10",
              f"test_interval: {iterations}", "snapshot: 0", "snapshot_after_train: false",
              "solver_mode: GPU"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")


def run_step(step: Step, out: Path, seconds: float) -> dict:
    """Run one step with its output in ``out/<name>.log``; its result as a dict."""
    log = out / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(step.command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                timeout=max(1.0, seconds)).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {seconds:.0f} s"
        except OSError as exc:
            status = f"could not start ({exc})"
    lines = log.read_text(errors="replace").splitlines()
    return {"name": step.name, "what": step.what, "command": " ".join(map(str, step.command)),
            "status": status, "seconds": time.monotonic() - start, "tail": lines[-25:]}


def report(results: list, started: str) -> str:
    out = [f"# owlnet GPU check, {started} UTC", "",
           "| step | status | s | what |", "|---|---|---|---|"]
    out += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['what']} |"
            for r in results]
    for r in results:
        out += ["", f"## {r['name']}: {r['status']}", "", f"`{r['command']}`", "", "```",
                *r["tail"], "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.md and the step logs")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    parser.add_argument("--budget", type=float, default=TOTAL_SECONDS,
                        help=f"seconds for all steps together (default {TOTAL_SECONDS})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    deadline = time.monotonic() + args.budget
    results = []
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        if step.name == "slices_n2":
            write_short_solver(ROOT / "solvers/lenet_solver.prototxt", ROOT / SHORT_SOLVER)
        left = deadline - time.monotonic()
        if left < 5:
            results.append({"name": step.name, "what": step.what, "command": "", "tail": [],
                            "status": "skipped (time budget spent)", "seconds": 0.0})
            continue
        results.append(run_step(step, args.out, min(step.seconds, left)))
        print(f"{step.name}: {results[-1]['status']} ({results[-1]['seconds']:.0f} s)",
              flush=True)
    (args.out / "gpu_check.md").write_text(report(results, started))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

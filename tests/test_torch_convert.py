"""bench/gpu_vs_torch.py's owlnet -> PyTorch converter, checked on the CPU: after one SGD
step with the same rates both frameworks give the same loss (ResNet-20, BVLC GoogLeNet)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import owlnet  # noqa: E402
from owlnet import backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_vs_torch", ROOT / "bench" / "gpu_vs_torch.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def one_step_losses(path, batch, shape):
    """(loss before, loss after one SGD step) from owlnet's Solver and from the converted
    PyTorch model, Dropout off (its masks differ between the two)."""
    param = bench.train_net_param(path, batch, shape)
    for lp in param.layer:
        if lp.type == "Dropout":
            lp.dropout_param.dropout_ratio = 0.0
    solver = owlnet.get_solver(bench.solver_param(param))
    net = solver.net
    images, labels = bench.random_batch(net, batch, shape)
    net.blobs["data"].data[...] = images
    net.blobs["label"].data[...] = labels
    converted = bench.Torch(net, images, labels, torch.device("cpu"))
    last = len(net.layers) - 1
    owl_before = float(net.forward_range(0, last))
    solver.step(1)
    owl_after = float(net.forward_range(0, last))
    torch_before = float(converted.step().detach())
    with torch.no_grad():
        torch_after = float(converted.model(converted.inputs))
    return (owl_before, owl_after), (torch_before, torch_after)


def test_resnet20_one_sgd_step():
    backend.set_random_seed(0)
    owl, tch = one_step_losses(ROOT / "models" / "resnet20" / "train_val.prototxt", 4, (3, 32, 32))
    assert owl[1] != owl[0]
    np.testing.assert_allclose(owl, tch, rtol=1e-5)


@pytest.mark.slow
def test_googlenet_three_heads_one_sgd_step(zoo):
    backend.set_random_seed(0)
    path = zoo / "models" / "bvlc_googlenet" / "train_val.prototxt"
    owl, tch = one_step_losses(path, 1, (3, 224, 224))
    assert owl[1] != owl[0]
    np.testing.assert_allclose(owl, tch, rtol=1e-5)


def test_bench_runs_on_the_cpu(capsys):
    """The whole script on the CPU (its smoke mode): a row with both timings and their ratio;
    a case the budget cannot hold is reported as not run."""
    code = bench.main(["--device", "cpu", "--models", "resnet20,googlenet", "--math", "fp32",
                       "--batch", "2", "--iterations", "1", "--rounds", "1", "--warmup", "0",
                       "--budget", "40"])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("resnet20"))
    owl_ms, torch_ms, ratio = (float(v) for v in row.split()[2:5])
    assert owl_ms > 0 and torch_ms > 0 and abs(ratio - owl_ms / torch_ms) < 0.02, row
    assert "googlenet       fp32  not run:" in out

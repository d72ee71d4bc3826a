"""`owlnet time`: per-layer table and totals on the CPU; the GPU modules import without CuPy."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from owlnet import cli
from owlnet.tools import time as time_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "models" / "lenet" / "deploy.prototxt"
LENET_LAYERS = [("data", "Input"), ("conv1", "Convolution"), ("pool1", "Pooling"),
                ("conv2", "Convolution"), ("pool2", "Pooling"), ("ip1", "InnerProduct"),
                ("relu1", "ReLU"), ("ip2", "InnerProduct"), ("prob", "Softmax")]
TOTALS = ("Average Forward pass", "Average Backward pass", "Average Forward-Backward",
          "Total Time")


def _run(capsys, *argv):
    code = cli.main(["time", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(out):
    """{layer name: (type, forward ms, backward ms)} from the printed table."""
    rows = {}
    lines = out.splitlines()
    start = lines.index("Average time per layer:") + 2
    for line in lines[start:]:
        if line.startswith("Average Forward pass"):
            break
        name, kind, fwd, bwd = line.split()
        rows[name] = (kind, float(fwd), float(bwd))
    return rows


def _totals(out):
    return {name: float(re.search(rf"^{name}: ([0-9.e+-]+) ms\.$", out, re.M).group(1))
            for name in TOTALS}


def test_lenet_deploy_table_and_totals(capsys):
    code, out, err = _run(capsys, DEPLOY, "--batch", 2, "--iterations", 2)
    assert code == 0, err
    rows = _table(out)
    assert [(name, rows[name][0]) for name in rows] == LENET_LAYERS
    for name, (_, fwd, bwd) in rows.items():
        assert fwd > 0 and bwd > 0, name
    totals = _totals(out)
    assert all(value > 0 for value in totals.values())
    assert totals["Total Time"] >= totals["Average Forward-Backward"]
    assert len(re.findall(r"^Iteration: \d+ forward-backward time: ", out, re.M)) == 2


def test_batch_override_and_data_shape():
    lines = DEPLOY.read_text()
    from owlnet import config
    param, _ = config.read_net(lines)
    param = time_tool.prepare_net_param(param, batch=3)
    assert list(param.layer[0].input_param.shape[0].dim) == [3, 1, 28, 28]
    assert param.force_backward            # no loss: every layer runs backward

    train = config.read_net(str(ROOT / "models" / "lenet" / "train_test.prototxt"))[0]
    replaced = time_tool.prepare_net_param(train, batch=4, data_shape=(1, 28, 28))
    data_layers = [lp for lp in replaced.layer if lp.name == "mnist"]
    assert {lp.type for lp in data_layers} == {"DummyData"}
    assert [list(s.dim) for s in data_layers[0].dummy_data_param.shape] == [[4, 1, 28, 28], [4]]
    assert not replaced.force_backward


def test_train_net_with_random_data(capsys):
    model = ROOT / "models" / "lenet" / "train_test.prototxt"
    code, out, err = _run(capsys, model, "--batch", 2, "--iterations", 1, "--warmup", 0,
                          "--data-shape", "1,28,28")
    assert code == 0, err
    rows = _table(out)
    assert rows["mnist"][0] == "DummyData" and rows["loss"][0] == "SoftmaxWithLoss"


def test_stand_in_data_is_random_once_and_labels_zero():
    """The stand-in's data top is filled once with standard-normal values (its fillers are
    constant, so forward does not redraw); its label top stays class 0."""
    model = ROOT / "models" / "lenet" / "train_test.prototxt"
    param = time_tool.prepare_net_param(time_tool.config.read_net(str(model))[0], batch=8,
                                        data_shape=(1, 28, 28))
    stand_in = next(lp for lp in param.layer if lp.name == "mnist")
    assert {f.type for f in stand_in.dummy_data_param.data_filler} == {"constant"}
    net = time_tool.Net(param, phase=time_tool.TRAIN)
    time_tool._fill_inputs(net, ["mnist"])
    data = net.blobs["data"].data.copy()
    assert 0.8 < np.std(data) < 1.2 and not np.any(net.blobs["label"].data)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data)


@pytest.mark.parametrize("argv, words", [
    (["no/such/model.prototxt"], "not found"),
    ([DEPLOY, "--iterations", "0"], "--iterations"),
    ([DEPLOY, "--data-shape", "1,28"], "--data-shape"),
])
def test_errors_are_one_line(capsys, argv, words):
    code, out, err = _run(capsys, *argv)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("owlnet time: error:") and words in err


def test_gpu_kernels_import_without_cupy_and_match_cpu_names():
    cpu = importlib.import_module("owlnet.kernels.cpu")
    gpu = importlib.import_module("owlnet.kernels.gpu")
    public = [name for name in cpu.__all__ if callable(getattr(cpu, name))]   # the entry points
    assert public and all(callable(getattr(gpu, name, None)) for name in public)
    for name in ("conv_forward", "conv_backward_data", "conv_backward_filter"):
        assert callable(getattr(gpu, name))


def test_bench_help_runs_without_gpu_packages():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_vs_torch.py"), "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--batch" in done.stdout and "--math" in done.stdout


def test_caffes_time_spelling(capsys):
    code, out, err = _run(capsys, "-model", DEPLOY, "-iterations", 1, "--batch", 2, "-phase",
                          "TEST", "-stage", "deploy", "-level", 0)
    assert code == 0, err
    assert "phase TEST, 1 iterations" in out and "Use CPU." in err
    assert [name for name in _table(out)] == [name for name, _ in LENET_LAYERS]
    code, out, err = _run(capsys, DEPLOY, "--model", DEPLOY)
    assert code == 1 and "not both" in err


def test_memory_line_counts_the_blobs(capsys, monkeypatch):
    """On the CPU the memory line is the blobs' bytes: LeNet deploy at batch 2 has these
    activations (data and diff of each blob) and parameters (arena data and diff)."""
    code, out, err = _run(capsys, DEPLOY, "--batch", 2, "--iterations", 1)
    assert code == 0, err
    shapes = [(2, 1, 28, 28), (2, 20, 24, 24), (2, 20, 12, 12), (2, 50, 8, 8), (2, 50, 4, 4),
              (2, 500), (2, 10), (2, 10)]             # relu1 is in place on ip1
    activations = sum(2 * 4 * int(np.prod(s)) for s in shapes)
    parameters = 2 * 4 * (20 * 25 + 20 + 50 * 20 * 25 + 50 + 500 * 800 + 500 + 10 * 500 + 10)
    line = re.search(r"^Blob memory: ([0-9.]+) MiB \(activations ([0-9.]+) MiB, parameters "
                     r"and their diffs ([0-9.]+) MiB\)$", out, re.M)
    assert line, out
    assert float(line.group(2)) == round(activations / 2**20, 2)
    assert float(line.group(3)) == round(parameters / 2**20, 2)
    train = ROOT / "models" / "lenet" / "train_test.prototxt"
    args = (train, "--batch", 16, "--iterations", 1, "--data-shape", "1,28,28")
    code, out, err = _run(capsys, *args)
    plain = re.search(r"^Blob memory: .*\(activations ([0-9.]+) MiB,", out, re.M)
    monkeypatch.setenv("OWLNET_REUSE_MEMORY", "1")
    code, out, err = _run(capsys, *args)
    reused = re.search(r"^Blob memory: .*\(activations ([0-9.]+) MiB \(memory reused\)", out, re.M)
    assert plain and reused and float(reused.group(1)) < float(plain.group(1)), out


def test_train_phase_labels_are_valid_classes(tmp_path, capsys):
    """Input blobs read as a loss or Accuracy target are zeros (class 0), the others random:
    a standard-normal label would be refused by SoftmaxWithLoss."""
    model = tmp_path / "net.prototxt"
    model.write_text('name: "t"\n'
                     'layer { name: "in" type: "Input" top: "data" top: "label"\n'
                     '        input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                     '        inner_product_param { num_output: 3 } }\n'
                     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label"'
                     ' top: "loss" }\n'
                     'layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" '
                     'top: "acc" }\n')
    code, out, err = _run(capsys, model, "--iterations", 1)
    assert code == 0, err
    assert {"in", "ip", "loss", "acc"} <= set(_table(out))
    param = time_tool.prepare_net_param(time_tool.config.read_net(str(model))[0])
    net = time_tool.Net(param, phase=time_tool.TRAIN)
    time_tool._fill_inputs(net)
    assert not np.any(net.blobs["label"].data)
    assert np.std(net.blobs["data"].data) > 0.3

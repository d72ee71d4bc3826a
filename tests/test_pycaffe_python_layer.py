"""Python layers (type "Python"): Caffe's contract, learnable blobs, errors, refusal, training.

The user layers live in tests/pycaffe_layers.py, a module on sys.path as users' are.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import owlnet
from gradcheck import check_gradient, make_layer
from netutil import write_bar_lmdb
from owlnet import backend, parallel
from owlnet.errors import ConfigError
from owlnet.layer_types.python import REFUSE_VARIABLE, refuse_python_layers
from owlnet.solver import get_solver
import pycaffe_layers

ROOT = Path(__file__).resolve().parents[1]


def python_layer(name, cls, bottoms=(), tops=(), param_str="", extra=""):
    lines = [f'layer {{ name: "{name}" type: "Python"']
    lines += [f'  bottom: "{b}"' for b in bottoms] + [f'  top: "{t}"' for t in tops]
    lines.append(f'  python_param {{ module: "pycaffe_layers" layer: "{cls}" '
                 f"param_str: '{param_str}' }} {extra} }}")
    return "\n".join(lines)


def test_learnable_python_layer_gradients():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    text = ('name: "s" type: "Python" python_param { module: "pycaffe_layers" '
            "layer: \"ChannelScale\" param_str: '{\"init\": 0.7}' }")
    layer, bottom, top = make_layer(text, [x])
    np.testing.assert_array_equal(layer.blobs[0].data, [0.7] * 3)
    layer.blobs[0].data[...] = [0.5, -1.0, 2.0]
    check_gradient(layer, bottom, top)


def test_pyloss_equals_the_builtin_euclidean_loss():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    head = ('input: "a" input_shape { dim: 4 dim: 3 } input: "b" input_shape { dim: 4 dim: 3 }'
            " force_backward: true\n")
    mine = owlnet.Net(head + python_layer("loss", "EuclideanLoss", ["a", "b"], ["loss"],
                                          extra="loss_weight: 2"), owlnet.TRAIN)
    builtin = owlnet.Net(head + 'layer { name: "loss" type: "EuclideanLoss" bottom: "a" '
                         'bottom: "b" top: "loss" loss_weight: 2 }', owlnet.TRAIN)
    expected = np.sum((a - b) ** 2) / 4 / 2
    for net in (mine, builtin):
        out = net.forward(a=a, b=b)
        assert out["loss"].ravel()[0] == pytest.approx(expected, rel=1e-6)
        net.backward()
        np.testing.assert_allclose(net.blobs["a"].diff, 2 * (a - b) / 4, rtol=1e-5)
        np.testing.assert_allclose(net.blobs["b"].diff, -2 * (a - b) / 4, rtol=1e-5)


LINREG = """
name: "linreg"
{data}
layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "pred"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "xavier" }} }} }}
{loss}
"""


def test_pyloss_trains_a_linear_regression_with_the_solver(tmp_path):
    """Python data layer + InnerProduct + Python Euclidean loss, trained by SGD, learn the
    map the data comes from; the snapshot holds the learned weights."""
    net = tmp_path / "linreg.prototxt"
    net.write_text(LINREG.format(
        data=python_layer("data", "LinearData", tops=["x", "y"],
                          param_str='{"batch": 16, "seed": 3}'),
        loss=python_layer("loss", "EuclideanLoss", ["pred", "y"], ["loss"],
                          extra="loss_weight: 1")))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net}" base_lr: 0.2 momentum: 0.9 lr_policy: "fixed" '
                           f'max_iter: 300 display: 0 snapshot: 300 '
                           f'snapshot_prefix: "{tmp_path}/linreg" random_seed: 1')
    solver = get_solver(str(solver_file))
    first = solver.net.forward_backward()
    solver.solve()
    weights, bias = (b.data for b in solver.net.params["ip"])
    np.testing.assert_allclose(weights, pycaffe_layers.TRUE_W, atol=1e-3)
    np.testing.assert_allclose(bias, pycaffe_layers.TRUE_B, atol=1e-3)
    assert solver.net.forward()["loss"][0] < 1e-6 < first
    reloaded = owlnet.Net(str(net), str(tmp_path / "linreg_iter_300.caffemodel"), owlnet.TEST)
    np.testing.assert_array_equal(reloaded.params["ip"][0].data, weights)


def test_python_blobs_are_updated_saved_and_loaded(tmp_path):
    """A Python layer's self.blobs take the prototxt's lr_mult, one SGD step moves them by
    -lr * lr_mult * gradient, and they go through .caffemodel files."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    text = ('input: "x" input_shape { dim: 2 dim: 3 dim: 2 dim: 2 }\n'
            + python_layer("scale", "ChannelScale", ["x"], ["y"], param_str='{"init": 2.0}',
                           extra="param { lr_mult: MULT }")
            + '\nlayer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "x" '
              'top: "loss" }')
    for mult in (1, 0):
        net_file = tmp_path / f"net{mult}.prototxt"
        net_file.write_text(text.replace("MULT", str(mult)))
        solver = get_solver(f'net: "{net_file}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 '
                            "display: 0")
        solver.net.blobs["x"].data[...] = x
        # loss = sum((w x - x)^2) / 2N, so dloss/dw[c] = sum_n,h,w (w - 1) x^2 / N
        gradient = np.sum((2.0 - 1.0) * x ** 2, axis=(0, 2, 3)) / 2
        solver.step(1)
        w = solver.net.params["scale"][0].data
        np.testing.assert_allclose(w, 2.0 - 0.1 * mult * gradient, rtol=1e-5)
    path = tmp_path / "scale.caffemodel"
    trained = solver.net.params["scale"][0].data.copy()
    solver.net.params["scale"][0].data[...] = [5, 6, 7]
    solver.net.save(str(path))
    fresh = owlnet.Net(str(net_file), owlnet.TEST)
    np.testing.assert_array_equal(fresh.params["scale"][0].data, [2, 2, 2])
    assert not np.array_equal(trained, [5, 6, 7])
    fresh.copy_from(str(path))
    np.testing.assert_array_equal(fresh.params["scale"][0].data, [5, 6, 7])


def test_phase_and_param_str_reach_the_layer():
    text = python_layer("p", "PhaseAndParam", tops=["phase", "value"], param_str="2.5")
    for phase in (owlnet.TRAIN, owlnet.TEST):
        out = owlnet.Net(text, phase).forward()
        assert out["phase"] == phase and out["value"] == 2.5


def test_errors_in_user_code_keep_their_type_and_name_the_layer():
    net = owlnet.Net('input: "x" input_shape { dim: 2 }\n'
                     + python_layer("buggy", "FailsInForward", ["x"], ["y"]), owlnet.TEST)
    with pytest.raises(KeyError) as caught:
        net.forward()
    assert "Python layer 'buggy' (pycaffe_layers.FailsInForward.forward)" in \
        "\n".join(caught.value.__notes__)
    with pytest.raises(ValueError) as caught:          # raised in the user's setup
        owlnet.Net('input: "x" input_shape { dim: 2 }\n'
                   + python_layer("loss", "EuclideanLoss", ["x"], ["loss"]), owlnet.TEST)
    assert "layer 'loss'" in "\n".join(caught.value.__notes__)


@pytest.mark.parametrize("module, cls, message", [
    ("no_such_module_here", "X", "module 'no_such_module_here' not found on sys.path"),
    ("../evil", "X", "is not a module name"),
    ("pycaffe_layers", "Missing", "has no class 'Missing'"),
    ("pycaffe_layers", "NotALayer", "is not a subclass of owlnet.Layer"),
])
def test_bad_python_param_is_a_config_error(module, cls, message):
    text = (f'layer {{ name: "odd" type: "Python" top: "t" '
            f'python_param {{ module: "{module}" layer: "{cls}" }} }}')
    with pytest.raises(ConfigError, match=message) as caught:
        owlnet.Net(text, owlnet.TEST)
    assert "layer 'odd'" in str(caught.value)


SIDE_EFFECT_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("imported.txt").write_text("ran")
"""


def test_refusal_stops_before_any_import(tmp_path, monkeypatch):
    (tmp_path / "side_effect_mod.py").write_text(SIDE_EFFECT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    text = ('layer { name: "l" type: "Python" top: "t" '
            'python_param { module: "side_effect_mod" layer: "L" } }')
    monkeypatch.setenv(REFUSE_VARIABLE, "1")
    with pytest.raises(ConfigError, match="Python layers are refused"):
        owlnet.Net(text, owlnet.TEST)
    monkeypatch.delenv(REFUSE_VARIABLE)
    refuse_python_layers()
    assert os.environ[REFUSE_VARIABLE] == "1"
    with pytest.raises(ConfigError, match="side_effect_mod"):
        owlnet.Net(text, owlnet.TEST)
    assert not (tmp_path / "imported.txt").exists()


def test_the_model_folder_is_never_searched(tmp_path):
    """A module beside a downloaded prototxt is not imported (it is not on sys.path)."""
    (tmp_path / "model_side_mod.py").write_text(SIDE_EFFECT_MODULE)
    model = tmp_path / "deploy.prototxt"
    model.write_text('layer { name: "l" type: "Python" top: "t" '
                     'python_param { module: "model_side_mod" layer: "L" } }')
    with pytest.raises(ConfigError, match="not found on sys.path"):
        owlnet.Net(str(model), owlnet.TEST)
    assert not (tmp_path / "imported.txt").exists()


# -- data-parallel training -------------------------------------------------------------------
PARALLEL_NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{lmdb}" batch_size: 8 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "scale" type: "Python" bottom: "ip" top: "scaled"
  python_param {{ module: "pycaffe_layers" layer: "ChannelScale" }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "scaled" bottom: "label" top: "loss" }}
"""


@pytest.fixture(scope="module")
def lmdb_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyparallel")
    write_bar_lmdb(folder / "lmdb", 32, 0)
    (folder / "net.prototxt").write_text(PARALLEL_NET.format(lmdb=folder / "lmdb"))
    return folder


def _solver_file(folder, prefix):
    solver = folder / f"{prefix}_solver.prototxt"
    solver.write_text(f'net: "{folder / "net.prototxt"}" base_lr: 0.05 lr_policy: "fixed" '
                      f'max_iter: 12 display: 1 snapshot: 12 snapshot_prefix: "{folder}/{prefix}" '
                      "random_seed: 4")
    return solver


def _train(solver_path, n):
    backend.set_mode_cpu()
    solver = get_solver(str(solver_path))
    if n > 1:
        solver.parallel = parallel.DataParallel(solver, [None] * n)
    try:
        solver.solve()
    finally:
        if solver.parallel is not None:
            solver.parallel.close()
    return {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}


@pytest.fixture(scope="module")
def one_process(lmdb_folder):
    return _train(_solver_file(lmdb_folder, "one"), 1)


def test_python_layers_train_in_slices_as_on_one_device(lmdb_folder, one_process):
    two = _train(_solver_file(lmdb_folder, "two"), 2)
    assert not np.allclose(one_process["scale"][0], 1.0)          # the Python blob learned
    for name in one_process:
        for mine, theirs in zip(two[name], one_process[name]):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_python_layers_train_under_mpiexec(lmdb_folder, one_process, tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or \
        shutil.which("mpiexec")
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpiexec and mpi4py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    run = subprocess.run([mpiexec, "-n", "2", sys.executable,
                          str(ROOT / "tools" / "net_trainer.py"),
                          str(_solver_file(lmdb_folder, "mpi")), "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    net = owlnet.Net(str(lmdb_folder / "net.prototxt"),
                     str(lmdb_folder / "mpi_iter_12.caffemodel"), owlnet.TEST)
    for name in one_process:
        for mine, theirs in zip(net.params[name], one_process[name]):
            np.testing.assert_allclose(mine.data, theirs, rtol=1e-5, atol=1e-7)

"""The solver loop on a tiny net: log lines, loss smoothing, testing, snapshots, exact resume."""
from __future__ import annotations

import datetime
import io
import os
import re

import numpy as np
import pytest
from google.protobuf import text_format

from owlnet import logging as owl_logging
from owlnet import snapshot as snap
from owlnet.errors import ConfigError, SnapshotError, TrainingError
from owlnet.proto import caffe_pb2
from owlnet.solver import AdamSolver, SGDSolver, get_solver

NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 6 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 }
    data_filler { type: "uniform" min: 0 max: 2.999 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1"
  dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""

GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")
NUMBER = r"[-+]?[\d.]+(?:e[-+]?\d+)?|nan|inf"


@pytest.fixture
def log():
    """owlnet's log captured as text (restored to stderr afterwards)."""
    buffer = io.StringIO()
    owl_logging.configure(stream=buffer)
    yield buffer
    owl_logging.configure()


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    return path


def solver_text(net_file, tmp_path, **settings):
    fields = {
        "net": f'"{net_file}"', "base_lr": 0.1, "lr_policy": '"fixed"', "momentum": 0.9,
        "weight_decay": 0.001, "max_iter": 6, "display": 0, "random_seed": 7,
        "snapshot_prefix": f'"{tmp_path / "snap"}"', "snapshot_after_train": "false",
    }
    fields.update(settings)
    return "\n".join(f"{k}: {v}" for k, v in fields.items())


def messages(log):
    lines = log.getvalue().splitlines()
    assert lines and all(GLOG_PREFIX.match(line) for line in lines), lines[:3]
    return [GLOG_PREFIX.sub("", line) for line in lines]


def weights(solver):
    return [b.data.copy() for b in solver.net.learnable_params]


def test_log_lines_in_caffe_words(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, display=2, test_interval=3,
                                    test_iter=2, average_loss=2, test_compute_loss="true"))
    solver.solve()
    text = messages(log)
    assert "Solving tiny" in text
    assert "Learning Rate Policy: fixed" in text
    train = [m for m in text if re.fullmatch(rf"Iteration (\d+) \(({NUMBER}) iter/s, "
                                             rf"({NUMBER})s/2 iters\), loss = ({NUMBER})", m)]
    assert [int(m.split()[1]) for m in train] == [0, 2, 4]
    assert [m for m in text if m.startswith("Iteration") and ", lr = " in m] == \
        ["Iteration 0, lr = 0.1", "Iteration 2, lr = 0.1", "Iteration 4, lr = 0.1"]
    outputs = [m for m in text if m.startswith("    Train net output #0: loss = ")]
    assert len(outputs) == 3
    assert all(re.fullmatch(rf"    Train net output #0: loss = ({NUMBER}) "
                            rf"\(\* 1 = ({NUMBER}) loss\)", m) for m in outputs)
    # tests at 0 (test_initialization), 3, and 6 after training
    assert [m for m in text if "Testing net" in m] == [
        "Iteration 0, Testing net (#0)", "Iteration 3, Testing net (#0)",
        "Iteration 6, Testing net (#0)"]
    assert sum(m.startswith("    Test net output #1: accuracy = ") for m in text) == 3
    assert sum(bool(re.fullmatch(rf"    Test net output #0: loss = ({NUMBER}) \(\* 1 = "
                                 rf"({NUMBER}) loss\)", m)) for m in text) == 3
    assert sum(m.startswith("Test loss: ") for m in text) == 3
    assert any(re.fullmatch(rf"Iteration 6, loss = ({NUMBER})", m) for m in text)
    assert text[-1] == "Optimization Done."
    # what Caffe's tools/extra/parse_log.py reads: the month/day and time tokens of the prefix
    solving = next(line for line in log.getvalue().splitlines() if "Solving" in line).split()
    assert 1 <= int(solving[0][1:3]) <= 12 and 1 <= int(solving[0][3:5]) <= 31
    datetime.datetime.strptime(solving[1], "%H:%M:%S.%f")


def test_average_loss_smooths_the_displayed_loss(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, display=1, average_loss=3))
    losses = []
    forward_backward = solver.net.forward_backward

    def recording():
        losses.append(forward_backward())
        return losses[-1]

    solver.net.forward_backward = recording
    solver.step(6)
    shown = [float(m.rsplit("= ", 1)[1]) for m in messages(log)
             if re.match(r"Iteration \d+ \(", m)]
    expected = [np.mean(losses[max(0, k - 2):k + 1]) for k in range(6)]
    np.testing.assert_allclose(shown, expected, rtol=1e-5)


def test_test_returns_mean_outputs(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, test_interval=100, test_iter=3))
    results = solver.test(0)
    assert set(results) == {"accuracy", "loss"}
    assert 0.0 <= results["accuracy"] <= 1.0
    assert results["loss"] > 0
    # the test net uses the train net's weights
    for name in ("ip1", "ip2"):
        assert solver.test_nets[0].params[name][0].data is solver.net.params[name][0].data


def test_snapshot_files_and_atomic_writes(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, snapshot=2, max_iter=5,
                                    snapshot_after_train="true"))
    solver.solve()
    names = sorted(os.listdir(tmp_path))
    assert names == ["snap_iter_2.caffemodel", "snap_iter_2.solverstate",
                     "snap_iter_4.caffemodel", "snap_iter_4.solverstate",
                     "snap_iter_5.caffemodel", "snap_iter_5.solverstate", "tiny.prototxt"]
    model, state_path = snap.snapshot_paths(str(tmp_path / "snap"), 5)
    text = messages(log)
    assert f"Snapshotting to binary proto file {model}" in text
    assert f"Snapshotting solver state to binary proto file {state_path}" in text
    state = snap.read_solver_state(state_path)
    assert state.iter == 5 and state.learned_net == model
    assert len(state.history) == len(solver.net.learnable_params)
    for proto, blob in zip(state.history, solver.net.learnable_params):
        assert tuple(proto.shape.dim) == blob.shape
    saved = caffe_pb2.NetParameter.FromString(open(model, "rb").read())
    saved_ip1 = [layer for layer in saved.layer if layer.name == "ip1"][0]
    np.testing.assert_array_equal(np.asarray(saved_ip1.blobs[0].data),
                                  solver.net.params["ip1"][0].data.ravel())


def test_snapshot_only_at_interval_when_max_iter_is_a_multiple(log, net_file, tmp_path):
    get_solver(solver_text(net_file, tmp_path, snapshot=3, max_iter=3,
                           snapshot_after_train="true")).solve()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("snap")) == [
        "snap_iter_3.caffemodel", "snap_iter_3.solverstate"]


@pytest.mark.parametrize("settings", [
    {"type": '"SGD"'},
    {"type": '"Adam"', "base_lr": 0.01, "momentum2": 0.99, "clip_gradients": 1},
    {"type": '"Nesterov"', "lr_policy": '"multistep"', "gamma": 0.5,
     "stepvalue": "2\nstepvalue: 4", "iter_size": 2},
    {"type": '"AdaDelta"', "base_lr": 1, "momentum": 0.95, "delta": 1e-6,
     "regularization_type": '"L1"'},
])
def test_resume_is_bitwise_identical(log, net_file, tmp_path, settings):
    text = solver_text(net_file, tmp_path, test_interval=2, test_iter=1, **settings)
    straight = get_solver(text)
    straight.step(5)

    first = get_solver(text)
    first.step(3)
    _, state_path = first.snapshot()
    resumed = get_solver(text)
    resumed.restore(state_path)
    assert resumed.iter == 3
    resumed.step(2)

    assert resumed.iter == straight.iter == 5
    assert resumed.lr.current_step == straight.lr.current_step
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(straight.rule.history, resumed.rule.history):
        np.testing.assert_array_equal(a, b)


def test_solve_resume_file_and_find_snapshot(log, net_file, tmp_path):
    text = solver_text(net_file, tmp_path, snapshot=2, max_iter=4)
    straight = get_solver(text)
    straight.step(4)
    stopped = get_solver(text, action_callback=lambda: "none")
    stopped.step(2)                                  # writes snap_iter_2 (snapshot: 2)
    path = snap.find_snapshot(str(tmp_path / "snap"), 1, 2)
    assert path.endswith("snap_iter_2.solverstate")
    resumed = get_solver(text)
    resumed.solve(resume_file=path)
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SnapshotError, match="snap_iter_6.solverstate"):
        snap.find_snapshot(str(tmp_path / "snap"), 3, 2)


def test_nan_loss_raises_without_snapshot(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, snapshot_after_train="true"))

    def poison(s):
        if s.iter == 2:
            s.net.params["ip2"][0].data[...] = np.nan

    solver.on_iteration.append(poison)
    with pytest.raises(TrainingError, match="iteration 2"):
        solver.solve()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("snap")]


def test_action_callback_stop_and_snapshot(log, net_file, tmp_path):
    actions = iter(["none", "snapshot", "none", "stop"])
    solver = get_solver(solver_text(net_file, tmp_path, snapshot_after_train="true",
                                    max_iter=100),
                        action_callback=lambda: next(actions))
    seen = []
    solver.on_iteration.append(lambda s: seen.append(s.iter))
    solver.solve()
    assert seen == [1, 2, 3, 4]
    assert solver.iter == 4
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("snap")) == [
        "snap_iter_2.caffemodel", "snap_iter_2.solverstate",
        "snap_iter_4.caffemodel", "snap_iter_4.solverstate"]
    assert "Optimization stopped early." in messages(log)


def test_bad_action_is_an_error(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path), action_callback=lambda: "pause")
    with pytest.raises(ConfigError, match="pause"):
        solver.step(1)


def test_solver_classes_by_type_and_legacy_enum(log, net_file, tmp_path):
    assert type(get_solver(solver_text(net_file, tmp_path, type='"Adam"'))) is AdamSolver
    assert type(get_solver(solver_text(net_file, tmp_path, solver_type="ADAM"))) is AdamSolver
    assert type(get_solver(solver_text(net_file, tmp_path))) is SGDSolver
    direct = SGDSolver(solver_text(net_file, tmp_path))
    assert direct.type == "SGD" and direct.net.name == "tiny"
    message = text_format.Parse(solver_text(net_file, tmp_path, type='"RMSProp"', momentum=0),
                                caffe_pb2.SolverParameter())
    assert get_solver(message).type == "RMSProp"


@pytest.mark.parametrize("settings, words", [
    ({"type": '"Momentum"'}, "Momentum"),
    ({"type": '"Adam"', "solver_type": "ADAM"}, "solver_type"),
    ({"test_iter": 2}, "test_interval"),
    ({"test_iter": 2, "test_interval": 2, "test_state": "{ stage: 'a' }\n"
      "test_state: { stage: 'b' }"}, "test_state"),
    ({"train_net": '"other.prototxt"'}, "exactly one train net"),
    ({"average_loss": 0}, "average_loss"),
    ({"lr_policy": '"triangle"'}, "triangle"),
    ({"snapshot": 2, "snapshot_prefix": '"/no/such/folder/snap"'}, "/no/such/folder"),
])
def test_config_errors(log, net_file, tmp_path, settings, words):
    with pytest.raises(ConfigError, match=words):
        get_solver(solver_text(net_file, tmp_path, **settings))


def test_test_iter_count_with_test_net_files(log, net_file, tmp_path):
    text = solver_text(net_file, tmp_path).replace("net:", "train_net:")
    text += f'\ntest_net: "{net_file}"\ntest_net: "{net_file}"\ntest_iter: 1\ntest_interval: 5'
    with pytest.raises(ConfigError, match="test_iter"):
        get_solver(text)
    solver = get_solver(text + "\ntest_iter: 2")
    assert len(solver.test_nets) == 2


def test_paths_fall_back_to_the_solver_folder(log, tmp_path, monkeypatch):
    folder = tmp_path / "project" / "solvers"
    folder.mkdir(parents=True)
    (tmp_path / "project" / "nets").mkdir()
    (tmp_path / "project" / "nets" / "tiny.prototxt").write_text(NET)
    solver_file = folder / "solver.prototxt"
    solver_file.write_text('net: "nets/tiny.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                           'max_iter: 1\nsnapshot_prefix: "nets/snap"\n')
    monkeypatch.chdir(tmp_path)
    solver = get_solver(str(solver_file))
    assert solver.net.name == "tiny"
    assert solver.snapshot_prefix == str(tmp_path / "project" / "nets" / "snap")
    (folder / "bad.prototxt").write_text('net: "nets/absent.prototxt"\nbase_lr: 0.1\n'
                                         'lr_policy: "fixed"\n')
    with pytest.raises(ConfigError, match="absent.prototxt"):
        get_solver(str(folder / "bad.prototxt"))


# -- damaged snapshots ----------------------------------------------------------------------

@pytest.fixture
def snapshot_at_2(log, net_file, tmp_path):
    text = solver_text(net_file, tmp_path)
    solver = get_solver(text)
    solver.step(2)
    model, state = solver.snapshot()
    return text, model, state


def test_truncated_solverstate(snapshot_at_2):
    text, _, state = snapshot_at_2
    data = open(state, "rb").read()
    with open(state, "wb") as fh:
        fh.write(data[: len(data) // 3])
    with pytest.raises(SnapshotError, match=re.escape(state)):
        get_solver(text).restore(state)


def test_truncated_caffemodel(snapshot_at_2):
    text, model, state = snapshot_at_2
    data = open(model, "rb").read()
    with open(model, "wb") as fh:
        fh.write(data[:-7])
    with pytest.raises(SnapshotError, match=re.escape(model)):
        get_solver(text).restore(state)


def test_history_count_mismatch(snapshot_at_2):
    text, _, state = snapshot_at_2
    with pytest.raises(SnapshotError, match="history blobs"):
        get_solver(text + '\ntype: "Adam"').restore(state)


def test_history_shape_mismatch_names_the_blob(snapshot_at_2):
    text, _, state_path = snapshot_at_2
    state = snap.read_solver_state(state_path)
    state.history[2].shape.dim[:] = [1, 15]
    with open(state_path, "wb") as fh:
        fh.write(state.SerializeToString())
    with pytest.raises(SnapshotError, match=r"history blob #2 .*\(1, 15\)"):
        get_solver(text).restore(state_path)


def test_caffe_written_state_without_owlnet_extras_restores(snapshot_at_2):
    text, model, state_path = snapshot_at_2
    state = snap.read_solver_state(state_path)
    state.ClearField("owlnet_resume")
    with open(state_path, "wb") as fh:
        fh.write(state.SerializeToString())
    solver = get_solver(text)
    solver.restore(state_path)
    assert solver.iter == 2


def test_loss_of_a_top_that_is_not_an_output_counts(log, tmp_path):
    # Caffe's Test and the final display take the net's loss (Forward(&loss)), which includes
    # loss tops that other layers consume, not only weighted outputs.
    path = tmp_path / "consumed.prototxt"
    path.write_text(NET + 'layer { name: "twice" type: "Power" bottom: "loss" top: "twice" '
                          'power_param { scale: 2 } }\n')
    solver = get_solver(solver_text(path, tmp_path, max_iter=3, display=3, test_interval=3,
                                    test_iter=2, test_compute_loss="true",
                                    test_initialization="false"))
    solver.solve()
    text = messages(log)
    final = [m for m in text if re.fullmatch(rf"Iteration 3, loss = ({NUMBER})", m)]
    assert len(final) == 1 and float(final[0].rsplit("= ", 1)[1]) > 0
    test_loss = [float(m.split(": ")[1]) for m in text if m.startswith("Test loss: ")]
    twice = [float(m.split("= ")[1]) for m in text if m.startswith("    Test net output #1: twice")]
    assert len(test_loss) == 1 and test_loss[0] > 0
    np.testing.assert_allclose(test_loss[0], twice[0] / 2, rtol=1e-4)


def test_zero_test_iter_tests_nothing(log, net_file, tmp_path):
    solver = get_solver(solver_text(net_file, tmp_path, test_interval=100, test_iter=0))
    assert solver.test(0) == {}


def test_each_file_is_parsed_once(log, net_file, tmp_path, monkeypatch):
    """The solver file and the net file (train net, two test nets, a data-parallel replica)
    are each parsed once; error messages still name the net file's lines."""
    from owlnet import config
    parsed = []
    real_parse = config.parse_text
    monkeypatch.setattr(config, "parse_text",
                        lambda text, message, name="<string>": parsed.append(name)
                        or real_parse(text, message, name))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(solver_text(net_file, tmp_path, test_iter="1\ntest_iter: 1",
                                       test_interval=5))
    solver = get_solver(str(solver_file))
    solver.files.build_train_net()
    assert len(solver.test_nets) == 2
    assert parsed == [str(solver_file), str(net_file)]
    assert solver.net.source.name == str(net_file)
    assert solver.net.source.layer_line(1) == f"{net_file}:7"


@pytest.mark.parametrize("display, snapshot, found", [(4, 0, 4), (0, 5, 5), (0, 0, 6)])
def test_deferred_loss_check_names_the_bad_iteration(log, net_file, tmp_path, display,
                                                      snapshot, found):
    """As on a GPU: losses are read at display and snapshot iterations and at the end of
    step(); the error names the iteration whose loss went bad, and no snapshot of such
    weights is written."""
    solver = get_solver(solver_text(net_file, tmp_path, display=display, snapshot=snapshot))
    solver.loss_check.defer = True
    seen = []
    forward_backward = solver.net.forward_backward

    def as_on_a_device():
        loss = forward_backward()
        seen.append(loss)
        return loss                    # not read by the solver until a check

    def poison(s):
        if s.iter == 2:
            s.net.params["ip2"][0].data[...] = np.nan

    solver.net.forward_backward = as_on_a_device
    solver.on_iteration.append(poison)
    with pytest.raises(TrainingError, match=rf"iteration 2: the loss is nan; training "
                                            rf"stopped \(found at iteration {found}\)"):
        solver.step(6)
    assert len(seen) == found + (display > 0)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("snap")]


def test_loss_check_on_the_host_is_immediate():
    from owlnet.solver.solver import LossCheck
    check = LossCheck(defer=False)
    assert check.note(0, np.float32(1.5)) == 1.5 and isinstance(check.note(1, 2), float)
    with pytest.raises(TrainingError, match=r"^iteration 3: the loss is inf; training stopped "
                                            r"\(no snapshot"):
        check.note(3, np.float32(np.inf))

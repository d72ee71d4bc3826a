"""tools/net_trainer.py (owlnet train): training, --snapshot N resume, --weights fine-tuning."""
import pytest

from netutil import write_bar_lmdb
from owlnet import logging as owl_logging
from owlnet.tools import train

NET = """
name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TRAIN }} transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{train}" batch_size: 6 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label"
  include {{ phase: TEST }} transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{test}" batch_size: 6 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: {classes} weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "drop" type: "Dropout" bottom: "ip" top: "ip" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: 10
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 7
display: 5
max_iter: 20
snapshot: 10
snapshot_prefix: "{prefix}"
random_seed: 11
"""


@pytest.fixture
def job(tmp_path, capfd):
    owl_logging.configure()           # log to this test's captured stderr
    write_bar_lmdb(tmp_path / "train_lmdb", 30, 0)
    write_bar_lmdb(tmp_path / "test_lmdb", 12, 1)

    def make(classes=3, name="solver.prototxt", prefix="snap/tiny"):
        net = tmp_path / f"net{classes}.prototxt"
        net.write_text(NET.format(train=tmp_path / "train_lmdb", test=tmp_path / "test_lmdb",
                                  classes=classes))
        solver = tmp_path / name
        (tmp_path / prefix).parent.mkdir(exist_ok=True)
        solver.write_text(SOLVER.format(net=net, prefix=tmp_path / prefix))
        return solver
    make.dir = tmp_path
    return make


def test_train_writes_snapshots_and_logs_caffe_lines(job, capfd):
    solver = job()
    assert train.main([str(solver), "--no-progress"]) == 0
    snaps = sorted(p.name for p in (job.dir / "snap").iterdir())
    assert snaps == ["tiny_iter_10.caffemodel", "tiny_iter_10.solverstate",
                     "tiny_iter_20.caffemodel", "tiny_iter_20.solverstate"]
    err = capfd.readouterr().err
    assert "Iteration 5 (" in err and "iter/s" in err
    assert "Test net output #0: acc = " in err
    assert "Snapshotting to binary proto file" in err
    assert "Optimization Done." in err


def test_resume_from_snapshot_number_is_bitwise_identical(job):
    solver = job()
    assert train.main([str(solver), "--no-progress"]) == 0
    final = job.dir / "snap/tiny_iter_20.caffemodel"
    uninterrupted = final.read_bytes()
    final.unlink()
    (job.dir / "snap/tiny_iter_20.solverstate").unlink()
    assert train.main([str(solver), "--snapshot", "1", "--no-progress"]) == 0
    assert final.read_bytes() == uninterrupted


def test_missing_snapshot_names_the_path(job, capfd):
    solver = job()
    assert train.main([str(solver), "--snapshot", "3", "--no-progress"]) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert "tiny_iter_30.solverstate" in err and err.startswith("net_trainer: error:")


def test_weights_fine_tune_and_reinit_mismatched(job, capfd):
    assert train.main([str(job()), "--no-progress"]) == 0
    weights = str(job.dir / "snap/tiny_iter_20.caffemodel")
    other = job(classes=4, name="four.prototxt", prefix="four/tiny")
    assert train.main([str(other), "--weights", weights, "--no-progress"]) == 1
    assert "cannot copy param 0 of layer 'ip'" in capfd.readouterr().err
    assert train.main([str(other), "--weights", weights, "--reinit-mismatched",
                       "--no-progress"]) == 0
    assert "keeping its fresh initialisation" in capfd.readouterr().err


def test_bad_arguments_are_one_line_errors(job, capfd):
    assert train.main(["no/such/solver.prototxt"]) == 1
    assert "not found" in capfd.readouterr().err
    solver = job()
    assert train.main([str(solver), "--snapshot", "1", "--resume", "x"]) == 1
    assert "not both" in capfd.readouterr().err


def test_caffes_train_spellings(job, capfd):
    """`caffe train --solver=S --snapshot=X.solverstate` resumes as `SOLVER --snapshot N`."""
    solver = job()
    assert train.main([f"--solver={solver}", "-sighup_effect=none", "-sigint_effect", "stop",
                       "--iterations", "5", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "--iterations is not used by train" in err and "Use CPU." in err
    final = job.dir / "snap/tiny_iter_20.caffemodel"
    uninterrupted = final.read_bytes()
    final.unlink()
    state = job.dir / "snap/tiny_iter_10.solverstate"
    assert train.main(["-solver", str(solver), f"--snapshot={state}", "--no-progress"]) == 0
    assert final.read_bytes() == uninterrupted
    assert train.main([str(solver), "--solver", str(solver)]) == 1
    assert "not both" in capfd.readouterr().err
    assert train.main(["--no-progress"]) == 1
    assert "need a solver definition" in capfd.readouterr().err


def test_stage_and_level_reach_the_train_state(job, tmp_path, monkeypatch):
    """--stage/--level as Caffe's: added to the solver's train_state; the solver's relative
    net path is still found beside the solver file."""
    solver = job()
    net = solver.with_name("net3.prototxt")
    net.write_text(net.read_text() + 'layer { name: "extra" type: "ReLU" bottom: "ip" '
                   'top: "extra" include { stage: "deep" min_level: 2 } }\n')
    solver.write_text(solver.read_text().replace(str(net), "net3.prototxt"))
    monkeypatch.chdir(tmp_path.parent)
    param = train.solver_with_state(str(solver), ["deep", "b"], 2)
    assert list(param.train_state.stage) == ["deep", "b"] and param.train_state.level == 2
    assert param.net == str(net)
    built = train.get_solver(param)
    assert "extra" in built.net.layer_dict
    assert "extra" not in train.get_solver(train.solver_with_state(str(solver), ["deep"], 1)
                                           ).net.layer_dict


def test_weights_reach_test_only_layers(tmp_path):
    """Caffe's train --weights copies every file into the train net and into each test net, so
    a layer of the test net alone (here ``ip_test``) starts from the weights file too."""
    import numpy as np

    import owlnet
    net_text = """
    input: "x" input_shape { dim: 2 dim: 3 }
    input: "t" input_shape { dim: 2 dim: 1 }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
      inner_product_param { num_output: 1 } }
    layer { name: "ip_test" type: "InnerProduct" bottom: "x" top: "z" include { phase: TEST }
      inner_product_param { num_output: 2 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """
    (tmp_path / "net.prototxt").write_text(net_text)
    source = owlnet.Net(str(tmp_path / "net.prototxt"), owlnet.TEST)
    source.params["ip"][0].data[...] = 5
    source.params["ip_test"][0].data[...] = 7
    source.save(str(tmp_path / "w.caffemodel"))
    solver = owlnet.get_solver(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.1 '
                               'lr_policy: "fixed" test_iter: 1 test_interval: 10')
    train.fine_tune(solver, str(tmp_path / "w.caffemodel"), reinit_mismatched=False)
    np.testing.assert_array_equal(solver.net.params["ip"][0].data, 5)
    np.testing.assert_array_equal(solver.test_nets[0].params["ip_test"][0].data, 7)
    np.testing.assert_array_equal(solver.test_nets[0].params["ip"][0].data, 5)

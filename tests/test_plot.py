"""parse-log and plot (owlnet/tools/plot.py) on the log of a real, short training run."""
from __future__ import annotations

import csv
import math
import re
import sys

import pytest

from owlnet import logging as owl_logging
from owlnet.errors import ConfigError, DataError
from owlnet.solver import get_solver
from owlnet.tools import plot

NET = """
name: "two_layer"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 5 dim: 4 } shape { dim: 5 }
    data_filler { type: "gaussian" std: 1 }
    data_filler { type: "uniform" min: 0 max: 1.999 } } }
layer { name: "hidden" type: "InnerProduct" bottom: "data" top: "hidden"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "hidden" top: "hidden" }
layer { name: "score" type: "InnerProduct" bottom: "hidden" top: "score"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "score" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


@pytest.fixture(scope="module")
def training_log(tmp_path_factory):
    """A log written by owlnet's solver: display every 2 iterations, test every 3, lr halved
    every 2 iterations, 6 iterations in all."""
    folder = tmp_path_factory.mktemp("run")
    net = folder / "net.prototxt"
    net.write_text(NET)
    log = folder / "train.log"
    logger = owl_logging.logger
    saved = (list(logger.handlers), logger.level, logger.propagate)
    owl_logging.configure(log_file=str(log))
    try:
        solver = get_solver(
            f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "step"\ngamma: 0.5\nstepsize: 2\n'
            "momentum: 0.9\nmax_iter: 6\ndisplay: 2\ntest_interval: 3\ntest_iter: 2\n"
            f'random_seed: 3\nsnapshot_after_train: false\nsnapshot_prefix: "{folder}/s"\n')
        solver.solve()
    finally:     # put back whatever handlers were there (none, usually)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    return log


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [dict(zip(rows[0], map(float, r))) for r in rows[1:]]


def logged_values(log, kind, name):
    pattern = re.compile(rf"{kind} net output #\d+: {name} = (\S+)")
    return [float(m.group(1)) for m in map(pattern.search, log.read_text().splitlines()) if m]


def test_parse_log_writes_caffe_style_csv(training_log, tmp_path, capsys):
    assert plot.main(["parse-log", str(training_log), str(tmp_path)]) == 0
    header, train = read_csv(tmp_path / "train.log.train")
    assert header == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [r["NumIters"] for r in train] == [0, 2, 4]
    assert [r["LearningRate"] for r in train] == pytest.approx([0.1, 0.05, 0.025])
    assert [r["loss"] for r in train] == logged_values(training_log, "Train", "loss")

    header, test = read_csv(tmp_path / "train.log.test")
    assert header == ["NumIters", "Seconds", "LearningRate", "loss", "accuracy"]
    assert [r["NumIters"] for r in test] == [0, 3, 6]
    # the latest rate logged at or before the test's iteration
    assert [r["LearningRate"] for r in test] == pytest.approx([0.1, 0.05, 0.025])
    assert [r["accuracy"] for r in test] == logged_values(training_log, "Test", "accuracy")
    seconds = [r["Seconds"] for r in train + test]
    assert all(0 <= s < 60 for s in seconds)
    assert "3 rows" in capsys.readouterr().out


def test_parse_log_defaults_to_the_logs_folder(training_log):
    assert plot.parse_main([str(training_log)]) == 0
    assert (training_log.parent / "train.log.train").is_file()
    assert (training_log.parent / "train.log.test").is_file()


CAFFE_LOG = """\
I1231 23:59:58.000000  4242 solver.cpp:280] Solving CaffeNet
I1231 23:59:59.500000  4242 solver.cpp:404] Iteration 0, Testing net (#0)
I1231 23:59:59.750000  4242 solver.cpp:471]     Test net output #0: acc = 0.25
I1231 23:59:59.760000  4242 solver.cpp:471]     Test net output #1: acc = 0.5
I1231 23:59:59.800000  4242 solver.cpp:404] Iteration 0, Testing net (#1)
I1231 23:59:59.900000  4242 solver.cpp:471]     Test net output #0: acc = 0.75
I0101 00:00:00.000000  4242 solver.cpp:228] Iteration 0, loss = 2.3
I0101 00:00:00.000000  4242 solver.cpp:244]     Train net output #0: loss = -nan (* 1 = -nan loss)
I0101 00:00:01.000000  4242 sgd_solver.cpp:106] Iteration 0, lr = 0.01
"""


def test_parse_log_reads_caffe_logs(tmp_path):
    """Year rollover in glog stamps, -nan, several test nets and vector outputs."""
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    train, test = plot.parse_log(log)
    assert len(train) == 1 and math.isnan(train[0]["loss"])
    assert train[0]["Seconds"] == pytest.approx(2.0)
    assert train[0]["LearningRate"] == 0.01
    assert test == [
        {"NumIters": 0, "acc": 0.25, "acc#1": 0.5, "Seconds": pytest.approx(1.75),
         "LearningRate": 0.01},
        {"NumIters": 0, "TestNet": 1, "acc": 0.75, "Seconds": pytest.approx(1.9),
         "LearningRate": 0.01},
    ]
    assert plot.columns(test) == ["NumIters", "Seconds", "LearningRate", "acc", "acc#1",
                                  "TestNet"]


def test_parse_log_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="missing.log"):
        plot.parse_log(tmp_path / "missing.log")
    assert plot.main(["parse-log", str(tmp_path / "missing.log")]) == 1
    assert "missing.log" in capsys.readouterr().err
    log = tmp_path / "a.log"
    log.write_text(CAFFE_LOG)
    assert plot.main(["parse-log", str(log), str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_parse_log_names_a_csv_it_cannot_write(tmp_path, capsys):
    log = tmp_path / "a.log"
    log.write_text(CAFFE_LOG)
    (tmp_path / "a.log.train").mkdir()              # in the way of the CSV file
    assert plot.main(["parse-log", str(log)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("parse-log: error: ") and "a.log.train" in err


def test_plot_without_matplotlib_names_the_extra(training_log, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import fails
    with pytest.raises(ConfigError, match="matplotlib"):
        plot.plot([{"NumIters": 0, "loss": 1.0, "LearningRate": 0.1}], [], tmp_path / "x.png")
    assert plot.main(["plot", str(training_log), "--out", str(tmp_path / "x.png")]) == 1


def test_plot_draws_the_curves(training_log, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert plot.main(["plot", str(training_log), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "curves.svg"
    assert plot.main([str(training_log), "--out", str(out2)]) == 0      # `owlnet plot LOG`
    assert "<svg" in out2.read_text()[:500]


def test_plot_of_a_log_without_outputs(tmp_path, capsys):
    log = tmp_path / "empty.log"
    log.write_text("I0101 00:00:00.000000  1 x.py:1] Solving nothing\n")
    assert plot.main(["plot", str(log)]) == 1
    assert "no 'Train net output'" in capsys.readouterr().err


def test_parse_log_rows_as_caffes_script_writes_them(tmp_path, capsys):
    """NumIters as a float (``0.0``), a row's Seconds from its first output line, and no
    file for a table without rows (Caffe's parse_log.py)."""
    log = tmp_path / "train_only.log"
    log.write_text("".join(line + "\n" for line in CAFFE_LOG.splitlines()
                           if "Test" not in line))
    assert plot.main(["parse-log", str(log)]) == 0
    rows = (tmp_path / "train_only.log.train").read_text().splitlines()
    assert rows[0] == "NumIters,Seconds,LearningRate,loss"
    assert rows[1].startswith("0.0,2.0,0.01,")
    assert not (tmp_path / "train_only.log.test").exists()
    assert "Not writing" in capsys.readouterr().out

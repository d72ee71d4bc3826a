"""The gflags-style parser every tool shares, and Caffe's own ImageNet scripts' command lines."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from owlnet.data.datum import datum_to_array, parse_datum
from owlnet.data.db import LMDBReader
from owlnet.fileio import read_mean_binaryproto
from owlnet.tools import classify, convert, extract, mean, test as tester, time as time_tool, train
from owlnet.tools.flags import FlagParser, parse_bool

ROOT = Path(__file__).resolve().parents[1]


def parser():
    p = FlagParser(prog="demo")
    p.add_argument("root")
    p.add_argument("listfile", nargs="?")
    p.add_argument("db", nargs="?")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--gray", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resize_height", type=int, default=0)
    p.add_argument("--gpu")
    p.add_argument("-n", "--num-devices", type=int)
    return p


@pytest.mark.parametrize("argv, shuffle", [
    (["--shuffle", "img/", "l", "d"], True),         # a boolean never takes the next argument
    (["img/", "l", "d", "--shuffle"], True),
    (["-shuffle", "img/", "l", "d"], True),
    (["--shuffle=true", "img/", "l", "d"], True),
    (["--shuffle=1", "img/", "l", "d"], True),
    (["-shuffle=yes", "img/", "l", "d"], True),
    (["--shuffle=false", "img/", "l", "d"], False),
    (["--shuffle=0", "img/", "l", "d"], False),
    (["--noshuffle", "img/", "l", "d"], False),
    (["-noshuffle", "img/", "l", "d"], False),
    (["--shuffle", "--noshuffle", "img/", "l", "d"], False),   # the last spelling wins
    (["--noshuffle", "img/", "--shuffle", "l", "d"], True),
    (["img/", "l", "d"], False),
])
def test_boolean_spellings(argv, shuffle):
    args = parser().parse_args(argv)
    assert args.shuffle is shuffle
    assert (args.root, args.listfile, args.db) == ("img/", "l", "d")
    assert args.gray is False


@pytest.mark.parametrize("argv", [
    ["--resize_height=7", "--gpu=1"], ["--resize_height", "7", "--gpu", "1"],
    ["-resize_height", "7", "-gpu", "1"], ["-resize_height=7", "-gpu=1"],
    ["--resize-height", "7", "--gpu", "1"],          # '-' and '_' alike
])
def test_value_spellings(argv):
    args = parser().parse_args(["r", *argv])
    assert args.resize_height == 7 and args.gpu == "1"


def test_short_options_values_with_dashes_and_owl_negatives():
    p = parser()
    assert p.parse_args(["r", "-n", "4"]).num_devices == 4
    assert p.parse_args(["r", "-n4"]).num_devices == 4
    assert p.parse_args(["r", "--num_devices=4"]).num_devices == 4
    assert p.parse_args(["r", "--gpu", "-1"]).gpu == "-1"     # a flag's value, kept as given
    assert p.parse_args(["r", "--no-progress"]).no_progress is True
    assert p.parse_args(["r", "--no_progress=false"]).no_progress is False
    args = p.parse_args(["r", "--", "--shuffle"])             # after --, only positionals
    assert args.listfile == "--shuffle" and args.shuffle is False


@pytest.mark.parametrize("argv, message", [
    (["r", "--shufle"], "unknown flag '--shufle' (did you mean --shuffle?)"),
    (["r", "-solver", "s"], "unknown flag '-solver'"),
    (["r", "--shuffle=maybe"], "flag --shuffle: expected true or false, got 'maybe'"),
    (["r", "--noshuffle=true"], "--noshuffle takes no value"),
    (["r", "--nogpu"], "unknown flag '--nogpu'"),             # only booleans have --noflag
])
def test_bad_flags_are_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_bool_reads_gflags_values():
    assert [parse_bool(v) for v in ("true", "T", "1", "yes", "y")] == [True] * 5
    assert [parse_bool(v) for v in ("false", "F", "0", "no", "N")] == [False] * 5
    with pytest.raises(ValueError):
        parse_bool("2")


def test_every_tool_takes_single_dash_caffe_flags():
    args = train.build_parser().parse_args(
        ["-solver", "s.prototxt", "-gpu", "0,1", "-weights=w.caffemodel", "-sighup_effect",
         "stop", "-sigint_effect=none", "-stage", "a,b", "-level", "2", "-iterations", "9"])
    assert (args.solver, args.gpu, args.weights, args.sighup_effect, args.sigint_effect,
            args.stage, args.level, args.iterations) == (
        "s.prototxt", "0,1", "w.caffemodel", "stop", "none", "a,b", 2, 9)
    args = tester.build_parser().parse_args(["-model", "m", "-weights", "w", "-iterations", "3",
                                             "-gpu", "0"])
    assert (args.model, args.weights, args.iters, args.gpu) == ("m", "w", 3, "0")
    args = time_tool.build_parser().parse_args(["-model", "m", "-iterations", "3", "-phase",
                                                "TEST", "-gpu=0"])
    assert (args.model, args.iterations, args.phase, args.gpu) == ("m", 3, "TEST", "0")
    args = extract.build_parser().parse_args(["s", "fc7", "out", "-format", "txt",
                                              "--no-python-layers"])
    assert args.format == "txt" and args.no_python_layers
    args = classify.build_parser().parse_args(["d", "w", "x.png", "-multiview", "-top=2"])
    assert args.multiview and args.top == 2
    args = convert.build_parser().parse_args(["--gray", "r/", "l", "d", "-encoded=false"])
    assert args.gray and not args.encoded and args.root_folder == "r/"
    args = mean.build_parser().parse_args(["-backend", "lmdb", "db", "out"])
    assert (args.db, args.output) == ("db", "out")


@pytest.fixture
def imagenet_like(tmp_path):
    """Five small colour JPEGs in train/ with a Caffe list file, as ImageNet's layout."""
    rng = np.random.default_rng(5)
    root = tmp_path / "train"
    (root / "n01").mkdir(parents=True)
    lines = []
    for i in range(5):
        name = f"n01/img_{i}.JPEG"
        image = rng.integers(0, 256, size=(12 + i, 9 + 2 * i, 3), dtype=np.uint8)
        assert cv2.imwrite(str(root / name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        lines.append(f"{name} {i % 3}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_create_and_mean_imagenet_scripts_exact_command_lines(imagenet_like):
    """examples/imagenet/create_imagenet.sh and make_imagenet_mean.sh, as BVLC wrote them."""
    tools = ROOT / "tools"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = (f"cd {imagenet_like} && GLOG_logtostderr=1 {sys.executable} "
              f"{tools}/convert_imageset.py --resize_height=256 --resize_width=256 --shuffle "
              f"{imagenet_like}/train/ train.txt ilsvrc12_train_lmdb && "
              f"{sys.executable} {tools}/compute_image_mean.py ilsvrc12_train_lmdb "
              f"imagenet_mean.binaryproto")
    done = subprocess.run(script, shell=True, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Processed 5 files; skipped 0." in done.stdout
    with LMDBReader(str(imagenet_like / "ilsvrc12_train_lmdb")) as reader:
        stored = [(key.decode(), datum_to_array(parse_datum(value, key), key))
                  for key, value in reader]
    names = [key.split("_", 1)[1] for key, _ in stored]
    assert sorted(names) == [f"n01/img_{i}.JPEG" for i in range(5)]      # every image once
    assert [key[:8] for key, _ in stored] == [f"{i:08d}" for i in range(5)]
    assert all(array.shape == (3, 256, 256) for _, array in stored)
    expected = np.mean([array.astype(np.float64) for _, array in stored], axis=0)
    mean_image = read_mean_binaryproto(str(imagenet_like / "imagenet_mean.binaryproto"))
    assert mean_image.shape[-3:] == (3, 256, 256)
    np.testing.assert_allclose(mean_image.reshape(3, 256, 256), expected, rtol=1e-6)

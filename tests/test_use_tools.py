"""owlnet test / extract / classify (tools/net_tester.py, tools/feature_extractor.py), checked
against the net's own outputs computed here.

The data: 14 x 14 grey images, class k (0..9) a bright row at k + 2 over dim noise, written as
PNGs and converted with owlnet.tools.convert.
"""
import argparse
import os
import re

import cv2
import numpy as np
import pytest

import owlnet
from owlnet.data.datum import datum_to_array, parse_datum
from owlnet.data.db import LMDBReader
from owlnet.errors import ConfigError, DataError, SnapshotError
from owlnet.fileio import write_mean_binaryproto
from owlnet import cli
from owlnet import logging as owl_logging
from owlnet.tools import classify, convert, extract
from owlnet.tools import test as tester
from owlnet.views import ten_view_windows

SIZE, CROP, CLASSES, BATCH = 14, 12, 10, 10

CROP_NET = """
name: "cropnet"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ crop_size: {crop} mean_file: "{mean}" scale: 0.00390625 }}
  data_param {{ source: "{train}" batch_size: {batch} backend: LMDB }}
  include {{ phase: TRAIN }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ crop_size: {crop} mean_file: "{mean}" scale: 0.00390625 }}
  data_param {{ source: "{test}" batch_size: {batch} backend: LMDB }}
  include {{ phase: TEST }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 3 kernel_size: 3 stride: 2
    weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param {{ num_output: {classes} weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip" top: "prob" include {{ phase: TEST }} }}
"""

SOLVER = """
net: "{net}"
test_iter: 2
test_interval: 1000
test_initialization: false
base_lr: 0.05
momentum: 0.9
lr_policy: "fixed"
max_iter: 1000
snapshot: 5
snapshot_prefix: "{prefix}"
random_seed: 3
"""

CLASSIFY_LAYERS = """
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
"""
CLASSIFY_TRAIN = """
name: "bars"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ mean_value: 20 scale: 0.00390625 }}
  data_param {{ source: "{train}" batch_size: 10 backend: LMDB }} }}
{layers}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""
CLASSIFY_DEPLOY = """
name: "bars"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: 2 dim: 1 dim: {size} dim: {size} }} }} }}
{layers}
layer {{ name: "prob" type: "Softmax" bottom: "ip" top: "prob" }}
"""


def bar_image(label, rng):
    image = rng.integers(0, 40, (SIZE, SIZE), dtype=np.uint8)
    image[label + 2, :] = 200 + rng.integers(0, 40, SIZE)
    return image


def write_images(folder, count, seed):
    """PNG files and a list file; returns (list path, [(path, label, uint8 image)])."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    entries, lines = [], []
    for i in range(count):
        label = i % CLASSES
        image = bar_image(label, rng)
        path = folder / f"img{i:03d}.png"
        cv2.imwrite(str(path), image)
        entries.append((str(path), label, image))
        lines.append(f"{path.name} {label}")
    listfile = folder / "list.txt"
    listfile.write_text("\n".join(lines) + "\n")
    return listfile, entries


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Data, a trained crop net with a snapshot, and a trained classifier."""
    root = tmp_path_factory.mktemp("use_tools")
    lists = {}
    for name, count, seed in (("train", 50, 0), ("test", 20, 1)):
        listfile, entries = write_images(root / name, count, seed)
        assert convert.main(["--gray=true", str(root / name) + "/", str(listfile),
                             str(root / f"{name}_lmdb")]) == 0
        lists[name] = entries
    mean = np.mean([e[2] for e in lists["train"]], axis=0)[np.newaxis]   # 1 x 14 x 14
    write_mean_binaryproto(root / "mean.binaryproto", mean)
    net_path = root / "cropnet.prototxt"
    net_path.write_text(CROP_NET.format(crop=CROP, mean=root / "mean.binaryproto",
                                        train=root / "train_lmdb", test=root / "test_lmdb",
                                        batch=BATCH, classes=CLASSES))
    (root / "snap").mkdir()
    solver_path = root / "solver.prototxt"
    solver_path.write_text(SOLVER.format(net=net_path, prefix=root / "snap" / "crop"))
    solver = owlnet.get_solver(str(solver_path))
    solver.step(5)
    solver.snapshot()                       # snapshot number 1 (iteration 5)
    weights = root / "crop.caffemodel"
    solver.net.save(weights)

    train = root / "bars_train.prototxt"
    train.write_text(CLASSIFY_TRAIN.format(train=root / "train_lmdb", layers=CLASSIFY_LAYERS))
    bars = owlnet.get_solver(f'net: "{train}" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" '
                             f'max_iter: 1000 random_seed: 5')
    bars.step(150)
    bars_weights = root / "bars.caffemodel"
    bars.net.save(bars_weights)
    deploy = root / "bars_deploy.prototxt"
    deploy.write_text(CLASSIFY_DEPLOY.format(size=SIZE, layers=CLASSIFY_LAYERS))
    return argparse.Namespace(root=root, solver=str(solver_path), net=str(net_path),
                              weights=str(weights), mean=mean, lists=lists,
                              deploy=str(deploy), bars_weights=str(bars_weights))


def reference_net(job):
    return owlnet.Net(job.net, weights=job.weights, phase=owlnet.TEST)


def softmax64(scores):
    scores = np.asarray(scores, dtype=np.float64)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hits(probs, labels, k):
    """Top-k hits counted as: the label is among the k most probable classes."""
    order = np.argsort(-probs, axis=1)[:, :k]
    return int((order == labels[:, None]).any(axis=1).sum())


def run_tester(argv):
    args = tester.build_parser().parse_args(argv)
    return tester.run(args)


# -- net_tester -------------------------------------------------------------------------------
def test_single_view_matches_the_net_outputs(job, capsys):
    result = run_tester([job.solver, "--weights", job.weights, "--accuracy", "acc"])
    out = capsys.readouterr().out
    net = reference_net(job)
    top1 = top5 = 0
    for batch in range(2):
        net.forward()
        probs = softmax64(net.blobs["ip"].data)
        labels = net.blobs["label"].data.astype(int)
        top1 += hits(probs, labels, 1)
        top5 += hits(probs, labels, 5)
        assert result.batches[batch][0] == pytest.approx(hits(probs, labels, 1) / BATCH)
        assert result.batches[batch][2] == pytest.approx(float(net.blobs["acc"].data))
    assert result.images == 2 * BATCH
    assert (result.top1, result.top5) == (top1 / 20, top5 / 20)
    assert 0 < result.top5 and result.top1 < 1          # the check is not vacuous
    assert result.accuracy == pytest.approx(result.top1)
    assert "Batch 1: top-1 = " in out and f"top-1 accuracy = {top1 / 20:.4f}" in out
    # raw scores rank like their softmax; --snapshot 1 is iteration 5, the saved weights
    same = run_tester([job.solver, "--snapshot", "1", "--softmax", "ip"])
    assert (same.top1, same.top5) == (result.top1, result.top5)


def test_multiview_matches_ten_crops_computed_here(job):
    result = run_tester([job.solver, "--weights", job.weights, "--multiview", "--iters", "2"])
    net = reference_net(job)
    images = np.array([e[2] for e in job.lists["test"]], dtype=np.float64)   # 20 x 14 x 14
    labels = np.array([e[1] for e in job.lists["test"]])
    normalized = (images - job.mean) * 0.00390625
    corners = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    probs = np.zeros((20, CLASSES))
    for mirrored in (False, True):
        for h, w in corners:
            views = normalized[:, h:h + CROP, w:w + CROP]
            if mirrored:
                views = views[:, :, ::-1]
            for start in range(0, 20, BATCH):
                net.blobs["data"].data[...] = views[start:start + BATCH, np.newaxis]
                net.blobs["label"].data[...] = labels[start:start + BATCH]
                net.forward(start="conv")
                probs[start:start + BATCH] += softmax64(net.blobs["ip"].data) / 10
    assert result.top1 == hits(probs, labels, 1) / 20
    assert result.top5 == hits(probs, labels, 5) / 20


def test_ten_view_windows_are_corners_and_centre():
    windows = ten_view_windows(256, 260, 227, 227)
    assert [tuple(w) for w in windows[:5]] == [(0, 0, False), (0, 33, False), (29, 0, False),
                                               (29, 33, False), (14, 16, False)]
    assert [tuple(w) for w in windows[5:]] == [(h, w, True) for h, w, _ in windows[:5]]


def test_probability_source_falls_back_to_softmax_of_the_loss_input(job):
    net = owlnet.Net(job.net, phase=owlnet.TRAIN)
    assert tester.probability_source(net, None) == ("ip", True)
    assert tester.probability_source(reference_net(job), None) == ("prob", False)


def test_missing_snapshot_names_the_file(job, capsys):
    with pytest.raises(SnapshotError, match=r"crop_iter_35\.caffemodel"):
        run_tester([job.solver, "--snapshot", "7"])
    assert cli.main(["test", job.solver, "--snapshot", "7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("net_tester: error: no snapshot weights ")


def test_multiview_with_accuracy_layer_is_refused(job):
    with pytest.raises(ConfigError, match="--multiview"):
        run_tester([job.solver, "--weights", job.weights, "--multiview", "--accuracy", "acc"])


# -- feature_extractor ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "txt", "lmdb"])
def test_extracted_features_equal_the_blobs(job, fmt, tmp_path, capsys):
    out = tmp_path / "features"
    args = extract.build_parser().parse_args(
        [job.solver, "ip,conv", str(out), "--weights", job.weights, "--format", fmt])
    assert extract.run(args) == 20
    assert "Extracted features of 20 images for blobs ip, conv" in capsys.readouterr().out
    net = reference_net(job)
    expected = {"ip": [], "conv": []}
    for _ in range(2):
        net.forward()
        for name in expected:
            expected[name].append(net.blobs[name].data.copy())
    for name, batches in expected.items():
        want = np.concatenate(batches)
        flat = want.reshape(len(want), -1)
        if fmt == "npy":
            got = np.load(out / f"{name}.npy")
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, flat)
        elif fmt == "txt":
            np.testing.assert_array_equal(np.loadtxt(out / f"{name}.txt", dtype=np.float32),
                                          flat)
        else:
            with LMDBReader(out / f"{name}.lmdb") as reader:
                records = list(reader)
            assert [key for key, _ in records] == [b"%010d" % i for i in range(20)]
            for (key, value), row in zip(records, want):
                datum = parse_datum(value, key)
                shape = row.shape + (1,) * (3 - row.ndim)
                assert (datum.channels, datum.height, datum.width) == shape
                np.testing.assert_array_equal(datum_to_array(datum, key), row.reshape(shape))


def test_lmdb_features_use_caffes_datum_layout(tmp_path):
    """extract_features sets channels, height, width (legacy axes) and float_data only: no
    label, no encoded flag, so the records are byte for byte Caffe's."""
    writer = extract._Writer(str(tmp_path / "f.lmdb"), "lmdb")
    batch = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    writer.add(batch)
    writer.close(complete=True)
    with LMDBReader(tmp_path / "f.lmdb") as reader:
        records = list(reader)
    for i, (key, value) in enumerate(records):
        want = owlnet.proto.caffe_pb2.Datum(channels=3, height=4, width=1)
        want.float_data.extend(batch[i].reshape(-1).tolist())
        assert key == b"%010d" % i and value == want.SerializeToString()


def test_npy_features_are_written_whole_or_not_at_all(tmp_path):
    batches = [np.full((2, 3), k, dtype=np.float32) for k in range(3)]
    done = extract._Writer(str(tmp_path / "done.npy"), "npy", batches=3)
    for batch in batches:
        done.add(batch)
    done.close(complete=True)
    np.testing.assert_array_equal(np.load(tmp_path / "done.npy"), np.concatenate(batches))
    failed = extract._Writer(str(tmp_path / "failed.npy"), "npy", batches=3)
    failed.add(batches[0])
    with pytest.raises(owlnet.errors.ShapeError, match="failed.npy"):
        failed.add(np.zeros((2, 4), np.float32))
    failed.close(complete=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.npy"]


def test_unknown_blob_lists_the_blobs(job, tmp_path, capsys):
    args = extract.build_parser().parse_args([job.solver, "ip,fc9", str(tmp_path / "f")])
    with pytest.raises(ConfigError, match=r"no blob or layer 'fc9' \(blobs: data, label.*ip"):
        extract.run(args)
    assert cli.main(["extract", job.solver, "fc9", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("feature_extractor: error: ") and "fc9" in err[-1]


# -- classify ---------------------------------------------------------------------------------
def classify_args(job, paths, *extra):
    return classify.build_parser().parse_args(
        [job.deploy, job.bars_weights, *map(str, paths), "--mean-value", "20",
         "--scale", "0.00390625", *extra])


def test_classify_finds_the_training_labels(job, capsys):
    entries = job.lists["train"][:12]
    results = classify.run(classify_args(job, [e[0] for e in entries], "--top", "3"))
    assert [best[0][0] for best in results] == [e[1] for e in entries]
    assert all(len(best) == 3 and best[0][1] > best[1][1] >= best[2][1] for best in results)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == entries[0][0] and len(out) == 12 * 4
    assert out[1].split()[1] == str(entries[0][1])


def test_classify_multiview_averages_ten_crops(job, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"bar {k}\n" for k in range(CLASSES)))
    path, label, _ = job.lists["train"][3]
    args = classify_args(job, [path], "--multiview", "--image-dims", "16,16",
                         "--labels", str(labels))
    classifier = classify.Classifier(job.deploy, job.bars_weights, mean=[20.0],
                                     scale=0.00390625, image_dims=(16, 16))
    got = classifier.predict([path], multiview=True)[0]
    # here: pycaffe's steps by hand on the resized image
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    big = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    net = owlnet.Net(job.deploy, weights=job.bars_weights, phase=owlnet.TEST)
    total = np.zeros(CLASSES)
    for h, w in [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]:
        crop = (big[h:h + SIZE, w:w + SIZE] * 255 - 20) * 0.00390625
        net.blobs["data"].data[...] = np.stack([crop, crop[:, ::-1]])[:, np.newaxis]
        total += net.forward()["prob"].sum(axis=0)
    np.testing.assert_allclose(got, total / 10, rtol=1e-5, atol=1e-6)
    assert classify.run(args)[0][0][0] == int(np.argmax(total))


def test_classify_single_view_is_pycaffes_centre_crop(job):
    """pycaffe's Classifier.predict(oversample=False): resize to image_dims, then the centre
    crop; without image_dims the image is resized to the input itself."""
    path = job.lists["train"][5][0]
    grey = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    net = owlnet.Net(job.deploy, weights=job.bars_weights, phase=owlnet.TEST)

    def probs_of(image):
        net.blobs["data"].data[...] = ((image * 255 - 20) * 0.00390625)[np.newaxis, np.newaxis]
        return net.forward()["prob"][0].copy()

    big = cv2.resize(grey, (17, 16), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    for dims, want in (((16, 17), probs_of(big[1:1 + SIZE, 1:1 + SIZE])),
                       (None, probs_of(grey.astype(np.float64)))):
        classifier = classify.Classifier(job.deploy, job.bars_weights, mean=[20.0],
                                         scale=0.00390625, image_dims=dims)
        np.testing.assert_allclose(classifier.predict([path])[0], want, rtol=1e-5, atol=1e-6)
    args = classify_args(job, [path], "--image-dims", "16,17", "--top", "10")
    got = dict(classify.run(args)[0])
    np.testing.assert_allclose([got[k] for k in range(CLASSES)],
                               probs_of(big[1:1 + SIZE, 1:1 + SIZE]), rtol=1e-5, atol=1e-6)


def test_classify_names_an_unreadable_image(job, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        classify.run(classify_args(job, [bad]))
    assert cli.main(["classify", job.deploy, job.bars_weights, str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("classify: error: ") and "broken.png" in err[0]


def test_preprocessor_swaps_scales_and_subtracts_the_mean():
    rgb = np.random.default_rng(0).random((1, 3, 4, 5)).astype(np.float32)
    mean = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    pre = classify.Preprocessor((3, 4, 5), raw_scale=255, scale=0.5, mean=mean)
    want = (rgb[:, ::-1].astype(np.float64) * 255 - mean) * 0.5      # BGR by default
    np.testing.assert_allclose(pre(rgb), want, rtol=1e-6)
    other_size = classify.Preprocessor((3, 4, 5), mean=np.ones((3, 8, 8)) * [[[1]], [[2]], [[3]]])
    np.testing.assert_allclose(other_size(rgb), rgb[:, ::-1] * 255 - [[[1]], [[2]], [[3]]],
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="channel-swap"):
        classify.Preprocessor((3, 4, 5), channel_swap=[0, 1])


# -- Caffe's `caffe test -model M -weights W` -----------------------------------------------------
def test_caffe_test_of_a_net_file_logs_caffes_lines(job, capfd):
    owl_logging.configure()
    assert cli.main(["test", "-model", job.net, "-weights", job.weights, "-iterations", "2"]) == 0
    err = capfd.readouterr().err
    net = reference_net(job)
    batches = []
    for _ in range(2):
        out = net.forward()
        batches.append({name: np.asarray(value, np.float64).ravel().copy()
                        for name, value in out.items()})
    logged = re.findall(r"\] Batch (\d+), (\S+) = (\S+)$", err, re.M)
    expected = [(str(i), name, value) for i, batch in enumerate(batches)
                for name in net.outputs for value in batch[name]]
    assert [(i, name) for i, name, _ in logged] == [(i, name) for i, name, _ in expected]
    np.testing.assert_allclose([float(v) for _, _, v in logged],
                               [v for _, _, v in expected], rtol=1e-5, atol=1e-7)
    mean_loss = (batches[0]["loss"][0] + batches[1]["loss"][0]) / 2
    assert float(re.search(r"\] Loss: (\S+)$", err, re.M).group(1)) == pytest.approx(mean_loss,
                                                                                      rel=1e-5)
    loss_line = re.search(r"\] loss = (\S+) \(\* 1 = (\S+) loss\)$", err, re.M)
    assert float(loss_line.group(1)) == pytest.approx(mean_loss, rel=1e-5)
    acc = float(re.search(r"\] acc = (\S+)$", err, re.M).group(1))
    assert acc == pytest.approx((batches[0]["acc"][0] + batches[1]["acc"][0]) / 2, rel=1e-5)


@pytest.mark.parametrize("argv, words", [
    (["--weights", "W"], "not both"),
    (["--snapshot", "1"], "--snapshot scores a solver's test net"),
    ([], "need model weights"),
])
def test_caffe_test_errors(job, capsys, argv, words):
    extra = [job.solver] if words == "not both" else []
    assert cli.main(["test", *extra, "--model", job.net, *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_no_python_layers_flag_sets_the_variable_for_the_process(job, monkeypatch):
    monkeypatch.setenv("OWLNET_NO_PYTHON_LAYERS", "0")
    result = run_tester([job.solver, "--weights", job.weights, "--iters", "1",
                         "--no-python-layers"])
    assert result.images == BATCH
    assert os.environ["OWLNET_NO_PYTHON_LAYERS"] == "0"     # run() alone leaves it
    assert cli.main(["test", job.solver, "--weights", job.weights, "--iters", "1",
                     "--no-python-layers"]) == 0
    assert os.environ["OWLNET_NO_PYTHON_LAYERS"] == "1"

"""The project's model zoo (models/, solvers/): every net builds with the right shapes, every
solver points at a net, the ResNet files are what scripts/make_resnet.py writes, and every
deploy net's saved weights give the same outputs in OpenCV's Caffe importer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import owlnet
from owlnet import config
from netutil import swap_data_layers

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MODEL_NAMES = sorted(p.name for p in MODELS.iterdir() if p.is_dir())
TRAIN_NETS = sorted(p for p in MODELS.glob("*/*.prototxt") if p.name != "deploy.prototxt")
DEPLOY_NETS = sorted(MODELS.glob("*/deploy.prototxt"))
SOLVERS = sorted((ROOT / "solvers").glob("*.prototxt"))
RESNET_DEPTHS = (20, 32, 56, 110)
SMALL = {"lenet", "cifar10_quick", "resnet20"}      # run forward + backward, not just build


def image_shape(model: str):
    """(channels, height, width) of the model's stored images, before any crop."""
    if model == "lenet":
        return (1, 28, 28)
    if model.startswith(("resnet", "cifar10")):
        return (3, 32, 32)
    return (3, 256, 256)


def classes(model: str) -> int:
    return 10 if image_shape(model)[1] <= 32 else 1000


def without_fillers(param):
    """The net with its weight fillers cleared (constant 0: cheap for the big nets, whose
    values the tests set or do not need)."""
    for lp in param.layer:
        for field in ("convolution_param", "inner_product_param"):
            if lp.HasField(field):
                getattr(lp, field).ClearField("weight_filler")
                getattr(lp, field).ClearField("bias_filler")
    return param


def build(path: Path, phase, batch=1, fillers=False):
    param = swap_data_layers(path, batch, image_shape(path.parent.name))
    return owlnet.Net(param if fillers else without_fillers(param), phase)


def shapes(net):
    return {name: blob.shape for name, blob in net.blobs.items()}


def layer_types(net):
    return [layer.param.type for layer in net.layers]


# -- every net builds -----------------------------------------------------------------------

def test_zoo_is_complete():
    expected = {"alexnet", "alexnet_nogroup", "caffenet", "googlenet", "cifar10_quick",
                "lenet"} | {f"resnet{d}" for d in RESNET_DEPTHS}
    assert set(MODEL_NAMES) == expected
    for name in MODEL_NAMES:
        assert (MODELS / name / "deploy.prototxt").is_file()
        assert len([p for p in TRAIN_NETS if p.parent.name == name]) == 1, name


def train_net_path(model: str) -> Path:
    return next(p for p in TRAIN_NETS if p.parent.name == model)


def cropped_shape(model: str):
    c, h, w = image_shape(model)
    param, _ = config.read_net(str(train_net_path(model)))
    crop = max((lp.transform_param.crop_size for lp in param.layer), default=0)
    return (c, crop or h, crop or w)


def check_train_net(model, net, phase):
    """What every train/test net must have: the input shape, losses, TEST-only accuracies,
    one score per class where scores are taken."""
    assert net.blobs["data"].shape == (1,) + cropped_shape(model)
    assert [n for n in net.outputs if net.output_loss_weights[n]], f"{model}: no loss output"
    accuracies = [n for n in net.outputs if not net.output_loss_weights[n]]
    assert bool(accuracies) == (phase == owlnet.TEST), net.outputs
    for layer in net.layers:
        if layer.param.type in ("SoftmaxWithLoss", "Accuracy"):
            scores = net.blobs[layer.param.bottom[0]]
            assert scores.shape == (1, classes(model)), (layer.param.name, scores.shape)


def forward_backward(net):
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = 1
    for layer in net.layers:          # TEST BatchNorm: unit variance, not the empty 0 / 0
        if layer.param.type == "BatchNorm":
            layer.blobs[1].data[...] = 1
            layer.blobs[2].data[...] = 1
    loss = net.forward_backward()
    assert np.isfinite(loss) and loss > 0
    first_weights = next(iter(net.params.values()))[0]
    assert np.any(first_weights.diff != 0)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_model_builds_in_both_phases_and_deploys(model):
    """The train net in TRAIN and TEST (data layers as Input of batch 1) and the deploy net
    build; small nets also run forward and backward; the deploy net's weighted layers match
    the train net's by name and shape, so trained weights load into it."""
    small = model in SMALL
    param_shapes = {}
    for phase in (owlnet.TRAIN, owlnet.TEST):
        net = build(train_net_path(model), phase, fillers=small)
        check_train_net(model, net, phase)
        ARCHITECTURE_CHECKS.get(model.rstrip("0123456789"), lambda *a: None)(model, net, phase)
        if small:
            forward_backward(net)
        param_shapes.update({name: [b.shape for b in blobs] for name, blobs in net.params.items()})
        del net

    deploy = owlnet.Net(without_fillers(config.read_net(str(MODELS / model / "deploy.prototxt"))[0]),
                        owlnet.TEST)
    assert deploy.outputs == ["prob"]
    assert deploy.blobs["data"].shape[1:] == cropped_shape(model)
    assert deploy.blobs["prob"].shape == (deploy.blobs["data"].shape[0], classes(model))
    for name, blobs in deploy.params.items():
        assert param_shapes.get(name) == [b.shape for b in blobs], \
            f"{model}: deploy layer '{name}' has no twin in the train net"


# -- shapes of each architecture ------------------------------------------------------------

def check_resnet(model, net, phase):
    depth = int(model[len("resnet"):])
    n = (depth - 2) // 6
    names = list(net.layer_dict)
    convs = [k for k in names if net.layer_dict[k].param.type == "Convolution"]
    projections = [k for k in convs if k.endswith("_proj")]
    fcs = [k for k in names if net.layer_dict[k].param.type == "InnerProduct"]
    # 6n+2 weighted layers on the main path: 6n+1 convolutions and the classifier
    assert len(convs) - len(projections) + len(fcs) == depth
    assert len(fcs) == 1 and len(projections) == 2
    assert not any(net.layer_dict[c].param.convolution_param.bias_term for c in convs)
    for conv in convs:     # each convolution is followed by BatchNorm then Scale, in place
        i = names.index(conv)
        assert [net.layer_dict[k].param.type for k in names[i + 1:i + 3]] == ["BatchNorm",
                                                                              "Scale"]
    assert layer_types(net).count("Eltwise") == 3 * n
    s = shapes(net)
    assert s["conv1"] == (1, 16, 32, 32)
    assert s[f"stage1_block{n}_sum"] == (1, 16, 32, 32)
    assert s["stage2_block1_proj"] == (1, 32, 16, 16)
    assert s[f"stage2_block{n}_sum"] == (1, 32, 16, 16)
    assert s[f"stage3_block{n}_sum"] == (1, 64, 8, 8)
    assert s["pool"] == (1, 64, 1, 1)
    assert s["fc10"] == (1, 10)
    assert net.params["stage3_block1_conv1"][0].shape == (64, 32, 3, 3)
    assert net.params["stage3_block1_proj"][0].shape == (64, 32, 1, 1)


def check_alexnet_family(model, net, phase):
    s = shapes(net)
    assert s["conv1"] == (1, 96, 55, 55)
    assert s["conv2"] == (1, 256, 27, 27)
    assert s["conv5"] == (1, 256, 13, 13)
    assert s["pool5"] == (1, 256, 6, 6)
    assert s["fc6"] == s["fc7"] == (1, 4096)
    if model == "alexnet":
        assert s["norm1"] == (1, 96, 55, 55)       # LRN, then pooling
    else:
        assert s["norm1"] == (1, 96, 27, 27)       # pooling, then LRN (CaffeNet's order)
    groups = 1 if model == "alexnet_nogroup" else 2
    assert net.params["conv2"][0].shape == (256, 96 // groups, 5, 5)
    assert net.params["conv4"][0].shape == (384, 384 // groups, 3, 3)
    assert net.params["conv5"][0].shape == (256, 384 // groups, 3, 3)


def check_googlenet(model, net, phase):
    weights = {"loss1/loss1": 0.3, "loss2/loss2": 0.3, "loss3/loss3": 1.0}
    assert {k: v for k, v in net.output_loss_weights.items() if v} == pytest.approx(weights)
    s = shapes(net)
    for head in ("loss1", "loss2", "loss3"):
        assert s[f"{head}/classifier"] == (1, 1000)
    assert s["loss1/ave_pool"] == (1, 512, 4, 4) and s["loss2/ave_pool"] == (1, 528, 4, 4)
    widths = {"3a": 256, "3b": 480, "4a": 512, "4b": 512, "4c": 512, "4d": 528, "4e": 832,
              "5a": 832, "5b": 1024}
    for tag, width in widths.items():
        side = {"3": 28, "4": 14, "5": 7}[tag[0]]
        assert s[f"inception_{tag}/output"] == (1, width, side, side), tag
    assert s["pool5/7x7_s1"] == (1, 1024, 1, 1)
    assert layer_types(net).count("Concat") == 9
    if phase == owlnet.TEST:
        assert len([n for n in net.outputs if "top-" in n]) == 6


def check_cifar10_quick(model, net, phase):
    s = shapes(net)
    assert s["pool1"] == (1, 32, 16, 16)
    assert s["pool2"] == (1, 32, 8, 8)
    assert s["pool3"] == (1, 64, 4, 4)
    assert s["ip1"] == (1, 64) and s["ip2"] == (1, 10)


ARCHITECTURE_CHECKS = {"resnet": check_resnet, "alexnet": check_alexnet_family,
                       "caffenet": check_alexnet_family,
                       "alexnet_nogroup": check_alexnet_family,
                       "googlenet": check_googlenet, "cifar10_quick": check_cifar10_quick}


def test_resnet20_trains_with_batch_statistics():
    """In TRAIN, BatchNorm normalises with the batch's statistics and updates its averages."""
    net = build(MODELS / "resnet20/train_val.prototxt", owlnet.TRAIN, batch=3, fillers=True)
    rng = np.random.default_rng(1)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape) * 50 + 20
    net.blobs["label"].data[...] = rng.integers(0, 10, 3)
    net.forward()
    conv1 = net.blobs["conv1"].data             # after BN, Scale (1, 0) and ReLU
    assert abs(float(np.mean(conv1)) - 0.4) < 0.1   # mean of max(0, N(0, 1)) = 0.399
    assert net.params["conv1_bn"][2].data[0] == 1


# -- solvers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SOLVERS, ids=lambda p: p.stem)
def test_solver_parses_and_names_a_zoo_net(path):
    param, _ = config.read_solver(str(path))
    assert param.net.startswith("models/")
    assert (ROOT / param.net).is_file(), param.net
    assert param.max_iter > 0 and param.base_lr > 0
    assert param.snapshot_prefix


def test_solver_for_every_model():
    named = {config.read_solver(str(p))[0].net.split("/")[1] for p in SOLVERS}
    assert named == set(MODEL_NAMES)


@pytest.mark.parametrize("depth", RESNET_DEPTHS)
def test_resnet_solver_is_the_180_epoch_schedule(depth):
    param, _ = config.read_solver(str(ROOT / f"solvers/resnet{depth}_solver.prototxt"))
    epoch = 391                                     # ceil(50,000 / 128)
    train_batch = config.read_net(str(ROOT / param.net))[0].layer[0].data_param.batch_size
    assert train_batch == 128
    assert param.lr_policy == "multistep"
    assert (param.base_lr, param.gamma) == pytest.approx((0.1, 0.1))
    assert list(param.stepvalue) == [90 * epoch, 135 * epoch]
    assert param.max_iter == 180 * epoch
    assert param.momentum == pytest.approx(0.9)
    assert param.weight_decay == pytest.approx(1e-4)


def _load_make_resnet():
    spec = importlib.util.spec_from_file_location("make_resnet", ROOT / "scripts/make_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_resnet_reproduces_the_committed_files():
    make_resnet = _load_make_resnet()
    written = make_resnet.files()
    assert len(written) == 3 * len(RESNET_DEPTHS)
    for rel, text in written.items():
        assert (ROOT / rel).read_text() == text, f"{rel} differs from scripts/make_resnet.py"
    assert make_resnet.main(["--check"]) == 0


# -- interoperability: OpenCV's Caffe importer reads our .caffemodel --------------------------

def fill_weights(net, rng):
    """Seeded random weights in He scaling, and BatchNorm statistics taken from the data
    flowing through the net (times a factor, so the stored moving-average scale matters),
    which keeps activations of the deep ResNets in a range where the outputs mean something."""
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].param.type
        if kind == "Scale":
            blobs[0].data[...] = rng.uniform(0.5, 1.5, blobs[0].shape)
        elif kind != "BatchNorm":
            fan_in = blobs[0].count // blobs[0].shape[0]
            blobs[0].data[...] = rng.standard_normal(blobs[0].shape, dtype=np.float32) * \
                np.float32(np.sqrt(2.0 / fan_in))
        if len(blobs) > 1 and kind != "BatchNorm":
            blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].shape)


def forward_calibrating_batchnorm(net, rng, factor=2.0):
    for index, (name, layer) in enumerate(net.layer_dict.items()):
        if layer.param.type == "BatchNorm":
            x = net.blobs[layer.param.bottom[0]].data
            axes = (0,) + tuple(range(2, x.ndim))
            mean, var = x.mean(axis=axes), x.var(axis=axes)
            layer.blobs[0].data[...] = mean * factor * rng.uniform(0.9, 1.1, mean.shape)
            layer.blobs[1].data[...] = var * factor * rng.uniform(0.8, 1.2, var.shape)
            layer.blobs[2].data[...] = factor
        net.forward_range(index, index)


@pytest.mark.parametrize("path", DEPLOY_NETS, ids=lambda p: p.parent.name)
def test_opencv_reads_our_caffemodel_and_agrees(path, tmp_path):
    cv2 = pytest.importorskip("cv2")
    model = path.parent.name
    rng = np.random.default_rng(7)
    param = without_fillers(config.read_net(str(path))[0])
    param.layer[0].input_param.shape[0].dim[0] = 1
    net = owlnet.Net(param, owlnet.TEST)
    fill_weights(net, rng)
    x = rng.uniform(-1, 1, net.blobs["data"].shape).astype(np.float32)
    if image_shape(model)[1] > 32:
        x *= 100                    # mean-subtracted pixels: LRN sees realistic magnitudes
    net.blobs["data"].data[...] = x
    forward_calibrating_batchnorm(net, rng)
    # scale the classifier so its scores are a few units: the probabilities then spread
    score_layer = list(net.layer_dict)[-2]          # the classifier, before the Softmax
    scores = net.blobs[net.top_names[score_layer][0]].data
    for blob in net.params[score_layer]:
        blob.data[...] *= np.float32(3 / np.abs(scores).max())
    net.forward_range(len(net.layers) - 2, len(net.layers) - 1)
    ours = {"prob": net.blobs["prob"].data.copy(),
            score_layer: net.blobs[net.top_names[score_layer][0]].data.copy()}
    weights = tmp_path / f"{model}.caffemodel"
    net.save(weights)

    cv_net = cv2.dnn.readNetFromCaffe(str(path), str(weights))
    weights.unlink()                # up to 240 MB; pytest keeps old temporary folders
    cv_net.setInput(x)
    theirs = dict(zip([score_layer, "prob"], cv_net.forward([score_layer, "prob"])))
    for name, value in ours.items():
        got = theirs[name].reshape(value.shape)
        error = np.abs(got - value).max() / np.abs(value).max()
        assert error <= 1e-4, f"{model}: '{name}' differs from OpenCV by {error:.2e} (relative)"
    # the probabilities are not all on one class, so the comparison above means something
    assert ours["prob"].max() < 0.999, ours["prob"].max()

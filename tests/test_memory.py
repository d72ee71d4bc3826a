"""Activation memory reuse (owlnet.memory): the same numbers with less memory."""
from pathlib import Path

import numpy as np
import pytest

import owlnet
from owlnet import backend, memory
from owlnet.errors import ConfigError
from owlnet.proto import caffe_pb2

from netutil import swap_data_layers

MODELS = Path(__file__).resolve().parents[1] / "models"

INCEPTION = """
name: "mini_inception"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1
                            weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "b1" type: "Convolution" bottom: "conv1" top: "b1"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "b2a" type: "Convolution" bottom: "conv1" top: "b2a"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "relu_b2a" type: "ReLU" bottom: "b2a" top: "b2a" }
layer { name: "b2" type: "Convolution" bottom: "b2a" top: "b2"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "b3" type: "Pooling" bottom: "conv1" top: "b3"
        pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "cat" type: "Concat" bottom: "b1" bottom: "b2" bottom: "b3" top: "cat" }
layer { name: "pool" type: "Pooling" bottom: "cat" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" dropout_param { dropout_ratio: 0.3 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "aux" type: "InnerProduct" bottom: "b2" top: "aux"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "aux_loss" type: "SoftmaxWithLoss" bottom: "aux" bottom: "label" top: "aux_loss"
        loss_weight: 0.3 }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }
"""

NETS = {
    "lenet": (MODELS / "lenet" / "train_test.prototxt", 4, (1, 28, 28), 10),
    "cifar10_quick": (MODELS / "cifar10_quick" / "train_val.prototxt", 3, (3, 32, 32), 10),
    "resnet20": (MODELS / "resnet20" / "train_val.prototxt", 2, (3, 32, 32), 10),
    "inception": (None, 2, (3, 12, 12), 5),
}


def build(name, reuse):
    path, batch, shape, classes = NETS[name]
    param = swap_data_layers(path, batch, shape) if path else INCEPTION
    backend.set_random_seed(7)
    net = owlnet.Net(param, owlnet.TRAIN, reuse_memory=reuse)
    rng = np.random.default_rng(3)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, classes, batch)
    return net


def train(net, steps=2):
    """Losses and parameter diffs of ``steps`` plain SGD steps (same seed for Dropout)."""
    losses, diffs = [], []
    backend.set_random_seed(11)
    for _ in range(steps):
        net.clear_param_diffs()
        losses.append(float(net.forward_backward()))
        diffs.append(net.arena.diff.copy())
        net.arena.data[...] -= net.arena.data.dtype.type(0.1) * net.arena.diff
    return losses, diffs


@pytest.mark.parametrize("name", list(NETS))
def test_reuse_gives_the_same_bits_with_less_memory(name):
    plain, shared = build(name, False), build(name, True)
    assert plain.memory_plan is None
    plan = shared.memory_plan
    message = f"{name}: {plan.summary()}"
    print(message)
    assert plan.planned_bytes < plan.activation_bytes, message
    assert len(plan.intervals) > 0, message
    (loss_a, diffs_a), (loss_b, diffs_b) = train(plain), train(shared)
    assert loss_a == loss_b, message
    for a, b in zip(diffs_a, diffs_b):
        assert np.array_equal(a, b), message
    # the kept blobs hold their values
    assert np.array_equal(plain.blobs["loss"].data, shared.blobs["loss"].data)


def test_plan_never_shares_live_arrays_and_respects_exclusions():
    net = build("inception", True)
    plan = net.memory_plan
    names = {(i.blob.name, i.which) for i in plan.intervals}
    for excluded in ("data", "label", "loss", "aux_loss", "acc"):
        assert (excluded, "data") not in names and (excluded, "diff") not in names
    split_tops = [n for n in net.blobs if n.endswith("_split_0")]
    assert split_tops and all((n, "data") not in names for n in split_tops)
    for a in plan.intervals:
        for b in plan.intervals:
            if a is b or a.end < b.start or b.end < a.start:
                continue
            assert (a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset), (
                f"{a.blob.name}.{a.which} and {b.blob.name}.{b.which} overlap in time and space")
    # the in-place ReLU's blob lives from b2a's forward (layer 6) to its backward
    b2a = next(i for i in plan.intervals if (i.blob.name, i.which) == ("b2a", "data"))
    assert b2a.start == 6 and b2a.end == 2 * len(net.layers) - 1 - 6
    # a Split's bottom data is planned once for it and its tops (which take it in forward)
    conv1 = next(i for i in plan.intervals if (i.blob.name, i.which) == ("conv1", "data"))
    assert conv1.start == 2 and conv1.end == 2 * len(net.layers) - 1 - 2
    assert sorted(t.name for t in conv1.aliases) == [f"conv1_relu1_0_split_{k}" for k in range(3)]
    assert all(t.data.base is conv1.blob.data.base for t in conv1.aliases)
    # a Split top read by a backward that no backward writes (Accuracy's) keeps its zeros
    assert ("fc_fc_0_split_1", "diff") not in names


def test_blobs_asked_for_are_kept_and_replanned():
    reference, net = build("inception", False), build("inception", True)
    wanted = reference.forward(blobs=["b2", "cat"])
    before = net.memory_plan.planned_bytes
    got = net.forward(blobs=["b2", "cat"])
    assert {"b2", "cat"} <= net.keep_blobs
    assert net.memory_plan.planned_bytes >= before
    for name in ("b2", "cat"):
        assert np.array_equal(wanted[name], got[name])
        assert all(i.blob.name != name for i in net.memory_plan.intervals)
    with pytest.raises(ConfigError, match="no blob 'nope'"):
        net.forward(blobs=["nope"])


def test_reshape_replans_and_default_is_off(monkeypatch):
    net = build("inception", True)
    net.blobs["data"].reshape(3, 3, 12, 12)
    net.blobs["label"].reshape(3)
    net.reshape()
    assert net.blobs["cat"].shape[0] == 3
    assert all(i.blob.shape[0] == 3 for i in net.memory_plan.intervals
               if i.blob.num_axes == 4)
    monkeypatch.setenv("OWLNET_REUSE_MEMORY", "1")
    param = caffe_pb2.NetParameter()
    from google.protobuf import text_format
    text_format.Parse(INCEPTION, param)
    assert owlnet.Net(param, owlnet.TRAIN).memory_plan is not None
    assert owlnet.Net(param, owlnet.TEST).memory_plan is None       # e.g. feature extraction
    monkeypatch.delenv("OWLNET_REUSE_MEMORY")
    assert owlnet.Net(param, owlnet.TRAIN).memory_plan is None


def test_place_packs_disjoint_lifetimes_together():
    items = [memory.Interval(None, "data", 1000, 0, 2), memory.Interval(None, "data", 1000, 3, 5),
             memory.Interval(None, "diff", 500, 1, 4)]
    size = memory.place(items)
    assert items[0].offset == items[1].offset == 0
    assert items[2].offset == memory.ALIGN * 4
    assert size == memory.ALIGN * 4 + memory.ALIGN * 2


MLP = """
name: "branchy_mlp"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 3 dim: 10 } shape { dim: 3 } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "a" type: "InnerProduct" bottom: "fc1" top: "a"
        inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "b" type: "InnerProduct" bottom: "fc1" top: "b"
        inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "a" top: "cat" }
layer { name: "drop" type: "Dropout" bottom: "cat" top: "cat" }
layer { name: "fc2" type: "InnerProduct" bottom: "cat" top: "fc2"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" }
"""


def test_same_bits_on_the_fake_device():
    """The GPU path (device arrays bound to views of one device buffer) on the fake device,
    against the same device path without reuse."""
    import fakecupy

    def build_mlp(reuse):
        backend.set_random_seed(7)
        net = owlnet.Net(MLP, owlnet.TRAIN, reuse_memory=reuse)
        net.blobs["data"].data[...] = np.random.default_rng(3).standard_normal((3, 10))
        net.blobs["label"].data[...] = [0, 3, 1]
        return net

    assert len(build_mlp(True).memory_plan.intervals) > 0
    with fakecupy.fake_gpu() as cupy:
        plain = build_mlp(False)
        with backend.device_arrays():       # the GPU Dropout draws its masks on the device
            losses, diffs = train(plain)
            expected = losses, [backend.to_host(d) for d in diffs]
        frees = cupy.get_default_memory_pool().frees
        net = build_mlp(True)
        assert cupy.get_default_memory_pool().frees == frees + 1   # the old arrays released
        assert type(next(iter(net.memory_plan.buffers.values()))) is not np.ndarray
        with backend.device_arrays():
            losses, diffs = train(net)
    assert losses == expected[0]
    for a, b in zip(diffs, expected[1]):
        assert np.array_equal(backend.to_host(a), b)


def test_solver_with_reuse_trains_the_same(monkeypatch):
    """Solver.step on a train net with reuse (switched on by $OWLNET_REUSE_MEMORY, as the GPU
    bench does) gives the weights and smoothed loss of the one without."""
    from google.protobuf import text_format
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("OWLNET_REUSE_MEMORY", flag)
        param = caffe_pb2.SolverParameter(base_lr=0.05, momentum=0.9, weight_decay=5e-4,
                                          lr_policy="fixed", max_iter=100, display=0,
                                          snapshot=0, random_seed=4, type="SGD")
        text_format.Parse(INCEPTION, param.net_param)
        solver = owlnet.get_solver(param)
        assert (solver.net.memory_plan is not None) == (flag == "1")
        rng = np.random.default_rng(3)
        solver.net.blobs["data"].data[...] = rng.standard_normal((2, 3, 12, 12))
        solver.net.blobs["label"].data[...] = [1, 4]
        solver.step(3)
        results.append((solver.smoothed_loss, solver.net.arena.data.copy()))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])


def test_forward_from_a_middle_layer():
    """pycaffe's forward(start=...) reads the start layer's bottoms as they are: kept blobs
    (keep_blobs) hold them across a backward; the bottoms are kept from the call on."""
    reference = build("inception", False)
    backend.set_random_seed(7)
    net = owlnet.Net(INCEPTION, owlnet.TRAIN, reuse_memory=True, keep_blobs=["pool"])
    for n in (reference, net):
        n.blobs["data"].data[...] = reference.blobs["data"].data
        n.blobs["label"].data[...] = reference.blobs["label"].data
        backend.set_random_seed(11)         # the same Dropout mask in both
        n.forward()
        n.backward()
    assert all(i.blob.name != "pool" for i in net.memory_plan.intervals)
    want = reference.forward(start="fc")["loss"].copy()
    assert np.array_equal(want, net.forward(start="fc")["loss"])
    plain = build("inception", True)
    plain.forward(start="fc")
    assert "pool" in plain.keep_blobs

"""The captured training step (owlnet.parallel.captured): which executor the solver picks and
why; the update rules with device-scalar rates equal the host-float ones bit for bit; and on
the fake device (tests/fakecupy.py: capture records every launch, refuses host syncs,
host-to-device copies and new device memory inside a capture, undoes the capture's effects
and replays the record) the captured step trains exactly as the eager one."""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
from google.protobuf import text_format

import fakecupy
from owlnet import backend
from owlnet.errors import DataError
from owlnet import logging as owl_logging
from owlnet.parallel import captured
from owlnet.parallel.executors import SingleDevice
from owlnet.proto import caffe_pb2
from owlnet.solver import get_solver, updates
from owlnet.solver.solver import LossCheck

gpu = pytest.mark.gpu


@pytest.fixture
def log_lines():
    """The messages owlnet logs during the test."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = owl_logging.logger.level
    owl_logging.logger.addHandler(handler)
    owl_logging.logger.setLevel(logging.INFO)
    yield lines
    owl_logging.logger.removeHandler(handler)
    owl_logging.logger.setLevel(level)

DATA = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 12 } shape { dim: 8 } } }
"""
# A ResNet-style block on vectors: fc -> BatchNorm -> Scale -> ReLU -> fc -> BatchNorm ->
# Scale, plus the shortcut, ReLU; then Dropout (optional) and the classifier.
RESNET_STYLE = DATA + """
layer { name: "fc0" type: "InnerProduct" bottom: "data" top: "fc0"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "fc1" type: "InnerProduct" bottom: "fc0" top: "fc1"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "fc1" top: "fc1" }
layer { name: "scale1" type: "Scale" bottom: "fc1" top: "fc1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
        inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "bn2" type: "BatchNorm" bottom: "fc2" top: "fc2" }
layer { name: "scale2" type: "Scale" bottom: "fc2" top: "fc2" scale_param { bias_term: true } }
layer { name: "sum" type: "Eltwise" bottom: "fc0" bottom: "fc2" top: "sum" }
layer { name: "relu2" type: "ReLU" bottom: "sum" top: "sum" }
DROPOUT
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }
"""
DROPOUT = """layer { name: "drop" type: "Dropout" bottom: "sum" top: "sum"
        dropout_param { dropout_ratio: 0.3 } }"""
LENET = DATA.replace("dim: 12", "dim: 1 dim: 28 dim: 28") + """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 6 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 20 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _solver(net_text, solver_type="SGD", **fields):
    param = caffe_pb2.SolverParameter(base_lr=0.05, lr_policy="step", gamma=0.5, stepsize=2,
                                      max_iter=100, display=0, snapshot_after_train=False,
                                      type=solver_type, weight_decay=1e-3, random_seed=3)
    if solver_type not in ("AdaGrad", "RMSProp"):
        param.momentum = 0.9
    for name, value in fields.items():
        setattr(param, name, value)
    text_format.Parse(net_text, param.net_param)
    return get_solver(param)


def _batches(net, steps, classes):
    rng = np.random.default_rng(11)
    shape = net.blobs["data"].shape
    return [(rng.standard_normal(shape).astype(np.float32),
             rng.integers(0, classes, shape[0]).astype(np.float32)) for _ in range(steps)]


@contextlib.contextmanager
def _device(where):
    """The fake device, or the real one ("gpu")."""
    if where == "fake":
        with fakecupy.fake_gpu():
            yield
        return
    backend.set_mode_gpu()
    try:
        yield
    finally:
        backend.set_mode_cpu()


def _train(net_text, eager, steps=5, classes=5, solver_type="SGD", where="fake"):
    """Losses, outputs, final parameters and history of ``steps`` single steps on the fake
    device (or the real one), with new host data before each step; ``eager``: SingleDevice
    instead of the selection."""
    with _device(where):
        solver = _solver(net_text, solver_type)
        if eager:
            solver.executor = SingleDevice(solver.net, solver.rule)
        executor = solver.executor
        losses = []
        for images, labels in _batches(solver.net, steps, classes):
            solver.net.blobs["data"].data[...] = images         # host writes, as pycaffe
            solver.net.blobs["label"].data[...] = labels
            solver.step(1)
            losses.append(float(solver.smoothed_loss))
        outputs = {name: solver.net.blobs[name].data.copy() for name in solver.net.outputs}
        params = [p.data.copy() for p in solver.net.learnable_params]
        history = [backend.to_host(h).copy() for h in solver.rule.history_buffers]
        return executor, losses, outputs, params, history


def _assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- selection ---------------------------------------------------------------------------------
def test_cpu_mode_runs_single_device():
    solver = _solver(RESNET_STYLE.replace("DROPOUT", ""))
    assert type(solver.executor) is SingleDevice


@pytest.mark.parametrize("fields, reason", [
    ({"iter_size": 2}, "iter_size is 2"),
    ({"clip_gradients": 1.0}, "clip_gradients reads the gradient norm on the host"),
    ({"average_loss": 5000}, "average_loss 5000 keeps more losses than the device ring"),
])
def test_blocked_settings_run_eagerly_and_say_why(fields, reason, log_lines):
    with fakecupy.fake_gpu():
        solver = _solver(RESNET_STYLE.replace("DROPOUT", ""), **fields)
    assert type(solver.executor) is SingleDevice
    assert sum(f"Training step runs eagerly: {reason}" in line for line in log_lines) == 1


def test_python_layer_and_callbacks_block_capture(log_lines):
    net = RESNET_STYLE.replace("DROPOUT", """layer { name: "py" type: "Python" bottom: "sum"
        top: "sum" python_param { module: "owlnet_test_identity" layer: "Identity" } }""")
    with fakecupy.fake_gpu():
        solver = _solver(RESNET_STYLE.replace("DROPOUT", ""))
        assert type(solver.executor) is captured.CapturedStep
        solver.add_callback(lambda: None, lambda: None)
        assert type(solver.executor) is SingleDevice
    assert sum("solver callbacks" in line for line in log_lines) == 1
    param = text_format.Parse(net, caffe_pb2.NetParameter())
    types = [layer.type for layer in param.layer]
    assert "Python" in types
    # The static check names the layer (the Net is not built: no Python module needed).
    fake_net = type("N", (), {"layers": [type("L", (), {"name": lp.name, "type": lp.type})()
                                         for lp in param.layer],
                              "bottom_names": {lp.name: list(lp.bottom) for lp in param.layer}})()
    reasons = captured.capture_blockers(fake_net, caffe_pb2.SolverParameter())
    assert reasons == ["layer 'py' (Python) cannot be captured"]


def test_data_parallel_executors_are_not_captured():
    """An attached data-parallel executor (Slices, RankSlices) runs the step itself; without
    one the selection comes back."""
    from owlnet.parallel.executors import Slices
    with fakecupy.fake_gpu():
        solver = _solver(RESNET_STYLE.replace("DROPOUT", ""))
        assert type(solver.executor) is captured.CapturedStep
        slices = Slices.__new__(Slices)                 # stands for one built by DataParallel
        solver.parallel = slices
        assert solver.executor is slices
        solver.parallel = None
        assert type(solver.executor) is captured.CapturedStep


def test_loss_ring_outlasts_the_pending_losses():
    assert LossCheck.limit < captured.LOSS_RING


# -- update rules with device-scalar rates -------------------------------------------------------
@pytest.mark.parametrize("rule_type", sorted(updates.RULES))
def test_rule_with_device_rates_is_bit_identical(rule_type):
    """Each rule, 6 updates with host floats against 6 with 0-d float64 arrays holding
    ``group_rates`` (as a replayed graph reads them), two groups of lr_mult: same bits."""
    text = RESNET_STYLE.replace("DROPOUT", "").replace(
        'bias_filler', 'bias_filler').replace(
        'num_output: 5 weight_filler { type: "xavier" } }',
        'num_output: 5 weight_filler { type: "xavier" } } param { lr_mult: 1 } '
        'param { lr_mult: 2.5 decay_mult: 0 }')
    results = []
    for device_rates in (False, True):
        solver = _solver(text, rule_type, delta=1e-6)
        net, rule = solver.net, solver.rule
        rng = np.random.default_rng(2)
        for it in range(6):
            net.arena.diff[...] = rng.standard_normal(net.arena.diff.shape).astype(np.float32)
            rate = solver.lr.rate(it)
            if device_rates:
                rates = [np.asarray(r, dtype=np.float64) for r in
                         rule.group_rates(net.arena, rate, it)]
                rule.apply(net, None, None, group_rates=rates)
            else:
                rule.apply(net, rate, it)
        results.append([net.arena.data.copy()] + [h.copy() for h in rule.history_buffers])
    assert len(solver.net.arena.learned) >= 2
    _assert_same(*results)


# -- capture on the fake device ----------------------------------------------------------------
def test_resnet_style_captured_equals_eager():
    """BatchNorm, Scale, Eltwise, ReLU, InnerProduct, SoftmaxWithLoss, Accuracy: the captured
    step (warm-up, capture, 3 replays) gives the eager step's losses, outputs, parameters and
    history bit for bit, with new host data each step."""
    text = RESNET_STYLE.replace("DROPOUT", "")
    eager = _train(text, eager=True)
    graph = _train(text, eager=False)
    executor = graph[0]
    assert type(executor) is captured.CapturedStep and executor.state == "replay"
    assert executor.forward_graph.records and executor.update_graph.records
    for want, got in zip(eager[1:], graph[1:]):
        if isinstance(want, dict):
            _assert_same(want.values(), got.values())
        else:
            _assert_same(want, got)


@pytest.mark.parametrize("rule_type", ["Adam", "Nesterov"])
def test_captured_rules_follow_the_rate_schedule(rule_type):
    """Graph B reads the rates written before each replay: the step policy's halving and
    Adam's per-iteration correction reach the replayed update."""
    text = RESNET_STYLE.replace("DROPOUT", "")
    eager = _train(text, eager=True, solver_type=rule_type)
    graph = _train(text, eager=False, solver_type=rule_type)
    assert graph[0].state == "replay"
    _assert_same(eager[3], graph[3])
    _assert_same(eager[4], graph[4])


def _host_drawn_dropout(monkeypatch):
    """Dropout as it was before its counted kernel: the mask drawn on the host, copied in."""
    from owlnet.layer_types.neuron import DropoutLayer

    def forward(self, bottom, top):
        mask = backend.rng().random(bottom[0].shape) < self.keep
        top[0].data[...] = bottom[0].data * backend.to_device(mask.astype(np.float32))
    monkeypatch.setattr(DropoutLayer, "forward", forward)
    monkeypatch.setattr(DropoutLayer, "backward", lambda self, top, down, bottom: None)


def test_a_layer_copying_from_the_host_falls_back_naming_it(log_lines, monkeypatch):
    """A layer that copies a host array in: the capture refuses the copy, the log names the
    layer, and training goes on eagerly."""
    _host_drawn_dropout(monkeypatch)
    text = RESNET_STYLE.replace("DROPOUT", DROPOUT)
    graph = _train(text, eager=False, steps=4)
    assert graph[0].state == "eager"
    lines = [line for line in log_lines if "runs eagerly" in line]
    assert len(lines) == 1 and "layer 'drop' (Dropout) cannot be captured" in lines[0]
    assert "host-to-device copy" in lines[0]


def test_host_sync_in_a_layer_is_refused_during_capture():
    """A host read inside the captured region (what a label check did) is a CaptureError of
    the fake, as CUDA refuses it; outside a capture it is allowed."""
    with fakecupy.fake_gpu() as cupy:
        x = cupy.ones(3, dtype=np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            with pytest.raises(fakecupy.CaptureError, match="host read"):
                float(x.sum())
            with pytest.raises(fakecupy.CaptureError, match="host-to-device"):
                cupy.asarray(np.ones(3))
            stream.end_capture()
        assert float(x.sum()) == 3.0


def test_fake_capture_records_undoes_and_replays():
    """The fake's capture does not run the work (its writes are undone), replays it on
    launch, and refuses memory the pool did not already hold."""
    with fakecupy.fake_gpu() as cupy:
        pool = cupy.cuda.MemoryPool()
        stream = cupy.cuda.Stream(non_blocking=True)
        x = cupy.zeros(4, dtype=np.float32)
        with stream, cupy.cuda.using_allocator(pool.malloc):
            y = x + 1                     # warm-up: the pool now holds one 16-byte block
            del y
            stream.begin_capture()
            x += x + 1                    # a temporary (the block again) and an in-place add
            with pytest.raises(fakecupy.CaptureError, match="new device memory"):
                cupy.empty(100, dtype=np.float32)
            graph = stream.end_capture()
        np.testing.assert_array_equal(x.get(), np.zeros(4))
        graph.launch(stream)
        graph.launch(stream)
        np.testing.assert_array_equal(x.get(), np.full(4, 3.0))
        assert pool.total_bytes() == 16


def test_fake_capture_replays_what_creators_write():
    """As in CuPy, a capture records the memset or copy of ``zeros`` and a copying
    ``ascontiguousarray``: each replay zeroes again and copies its source's current contents
    (what a pooling layer's fresh argmax and im2col's transposed gradient rely on)."""
    with fakecupy.fake_gpu() as cupy:
        source = cupy.arange(6, dtype=np.float32).reshape(3, 2)
        total = cupy.zeros(3, dtype=np.float32)
        pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)

        def work():
            counts = cupy.zeros(3, dtype=np.float32)
            counts += 1
            copy = cupy.ascontiguousarray(source.T)
            total[...] += copy.sum(axis=0) + counts
            return counts, copy

        with stream, cupy.cuda.using_allocator(pool.malloc):
            work()                                      # warm-up: the blocks the capture reuses
            total.fill(0)
            stream.begin_capture()
            counts, copy = work()
            graph = stream.end_capture()
            source += 10
            graph.launch(stream)
            graph.launch(stream)
        np.testing.assert_array_equal(counts.get(), np.ones(3))
        np.testing.assert_array_equal(copy.get(), np.arange(6).reshape(3, 2).T + 10)
        np.testing.assert_array_equal(total.get(), 2 * (np.array([1, 5, 9]) + 20 + 1))


def _conv_contract():
    import inspect

    from owlnet.kernels import cpu
    return "group" in inspect.signature(cpu.conv_forward).parameters


def test_lenet_captured_equals_eager():
    if not _conv_contract():
        pytest.skip("the layers still call the old convolution contract (issue 12)")
    eager = _train(LENET, eager=True, steps=4, classes=10)
    graph = _train(LENET, eager=False, steps=4, classes=10)
    assert graph[0].state == "replay"
    _assert_same(eager[1], graph[1])
    _assert_same(eager[3], graph[3])


# -- Dropout keyed by the device's iteration counter ------------------------------------------
def test_counted_dropout_draws_the_keyed_mask():
    """The counted kernel's body (C harness) gives counter_random's mask for
    draw_key(seed, iteration, layer), for iterations below and above 2^32."""
    import cuda_harness

    from owlnet.kernels import counter_random, cuda_sources
    shape, ratio, seed = (6, 50), 0.4, 1701
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    kernel = cuda_harness.c_kernel(cuda_sources.DROPOUT_FORWARD_COUNTED)
    seed_mix, layer_mix = counter_random.key_parts(seed, "drop")
    for iteration in (0, 7, 2 ** 32 + 5):
        y, keep = np.empty(shape, np.float32), np.empty(shape, np.uint8)
        kernel(x, np.array([iteration], np.uint64), seed_mix, layer_mix,
               counter_random.threshold(ratio), np.float32(1 / (1 - ratio)), y, keep)
        want = counter_random.dropout_keep(counter_random.draw_key(seed, iteration, "drop"),
                                           shape, ratio)
        np.testing.assert_array_equal(keep.astype(bool), want)
        np.testing.assert_array_equal(y, np.where(want, x * np.float32(1 / (1 - ratio)), 0))


def test_resnet_style_with_counted_dropout_captured_equals_eager():
    """With Dropout keyed by the iteration counter, the net with BatchNorm and Dropout is
    captured (no host sync, no host copy, no new memory inside) and each replay draws its
    own iteration's mask: results equal the eager step's bit for bit."""
    text = RESNET_STYLE.replace("DROPOUT", DROPOUT)
    eager = _train(text, eager=True)
    graph = _train(text, eager=False)
    assert graph[0].state == "replay"
    _assert_same(eager[1], graph[1])
    _assert_same(eager[3], graph[3])
    _assert_same(eager[4], graph[4])


# -- timing ----------------------------------------------------------------------------------
def test_time_steps_times_eager_and_captured_on_the_fake_device(monkeypatch):
    """`owlnet time`'s step line: both times for a capturable net, the reason otherwise."""
    with fakecupy.fake_gpu():
        solver = _solver(RESNET_STYLE.replace("DROPOUT", ""))
        arena = solver.net.arena
        before = backend.to_host(arena.data[:arena.learned_size]).copy()
        eager, graphs = captured.time_steps(solver.net, 2)
        assert eager > 0 and isinstance(graphs, float) and graphs > 0
        after = backend.to_host(arena.data[:arena.learned_size])
        np.testing.assert_array_equal(before, after)           # rate 0: weights unchanged
    with fakecupy.fake_gpu():
        solver = _solver(RESNET_STYLE.replace("DROPOUT", DROPOUT))
        eager, graphs = captured.time_steps(solver.net, 1)
        assert isinstance(graphs, float)
        _host_drawn_dropout(monkeypatch)
        eager, graphs = captured.time_steps(solver.net, 1)
        assert "layer 'drop' (Dropout) cannot be captured" in graphs


# -- on a real GPU -----------------------------------------------------------------------------
@gpu
def test_resnet_style_captured_equals_eager_on_the_device():
    """CuPy's real capture: the ResNet-style net with BatchNorm and counted Dropout is captured
    and replayed, equal to the eager step bit for bit (same kernels, same order)."""
    text = RESNET_STYLE.replace("DROPOUT", DROPOUT)
    eager = _train(text, eager=True, where="gpu")
    graph = _train(text, eager=False, where="gpu")
    assert graph[0].state == "replay", graph[0].reason
    assert graph[0].new_bytes == 0          # the warm-up left every block the captures took
    _assert_same(eager[1], graph[1])
    _assert_same(eager[3], graph[3])


@gpu
@pytest.mark.parametrize("rule_type", sorted(updates.RULES))
def test_every_rule_replays_its_rates_on_the_device(rule_type):
    text = RESNET_STYLE.replace("DROPOUT", "")
    eager = _train(text, eager=True, solver_type=rule_type, where="gpu")
    graph = _train(text, eager=False, solver_type=rule_type, where="gpu")
    assert graph[0].state == "replay", graph[0].reason
    _assert_same(eager[3], graph[3])
    _assert_same(eager[4], graph[4])


@gpu
def test_lenet_captured_matches_eager_on_the_device():
    """Convolution (cuDNN graphs on raw pointers), pooling, softmax loss: captured and
    replayed; cuDNN may pick non-deterministic backward algorithms, so within float32
    tolerance."""
    if not _conv_contract():
        pytest.skip("the layers still call the old convolution contract (issue 12)")
    eager = _train(LENET, eager=True, steps=6, classes=10, where="gpu")
    graph = _train(LENET, eager=False, steps=6, classes=10, where="gpu")
    assert graph[0].state == "replay", graph[0].reason
    np.testing.assert_allclose(graph[1], eager[1], rtol=1e-4)
    for want, got in zip(eager[3], graph[3]):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


@gpu
def test_counted_dropout_on_the_device():
    """The NVRTC build of the counted kernel draws counter_random's mask."""
    from owlnet.kernels import counter_random
    from owlnet.kernels import gpu as gpu_kernels
    with _device("gpu"):
        cupy = backend.import_cupy()
        shape, ratio = (64, 33), 0.25
        x = cupy.asarray(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
        y, keep = cupy.empty(shape, np.float32), cupy.empty(shape, np.uint8)
        for iteration in (3, 2 ** 32 + 1):
            gpu_kernels.set_iteration(iteration)
            gpu_kernels.dropout_forward_counted(x, y, keep, ratio, 99, "drop")
            want = counter_random.dropout_keep(counter_random.draw_key(99, iteration, "drop"),
                                               shape, ratio)
            np.testing.assert_array_equal(keep.get().astype(bool), want)


@gpu
def test_time_tool_prints_the_captured_step(tmp_path, capsys):
    from owlnet import cli
    model = tmp_path / "net.prototxt"
    model.write_text('name: "t"\n' + RESNET_STYLE.replace("DROPOUT", ""))
    assert cli.main(["time", str(model), "--gpu", "0", "--iterations", "5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith("Training step: eager ")]
    assert len(lines) == 1 and "not captured" not in lines[0], lines
    print(lines[0])


def test_a_new_batch_size_is_captured_again(log_lines):
    """Reshaping the net after the capture (pycaffe: blob reshape + net.reshape) makes the
    executor warm up and capture again instead of replaying stale shapes."""
    text = RESNET_STYLE.replace("DROPOUT", "")
    with fakecupy.fake_gpu():
        solver = _solver(text)
        rng = np.random.default_rng(0)
        for batch in (8, 8, 8, 8, 6, 6, 6, 6):
            net = solver.net
            if net.blobs["data"].shape[0] != batch:
                net.blobs["data"].reshape(batch, 12)
                net.blobs["label"].reshape(batch)
                net.reshape()
            net.blobs["data"].data[...] = rng.standard_normal((batch, 12)).astype(np.float32)
            net.blobs["label"].data[...] = rng.integers(0, 5, batch).astype(np.float32)
            solver.step(1)
            assert np.isfinite(float(solver.smoothed_loss))
        assert solver.executor.state == "replay"
        assert net.blobs["ip"].data.shape == (6, 5)
    assert sum("capturing it again" in line for line in log_lines) == 1


def test_replayed_losses_are_read_once_and_a_nan_stops_training():
    """The losses of the replayed iterations stay on the device until the end of ``step``
    (one device-to-host transfer for all of them); a NaN among them stops training naming
    its iteration."""
    from owlnet.errors import TrainingError
    text = RESNET_STYLE.replace("DROPOUT", "")
    with fakecupy.fake_gpu() as cupy:
        solver = _solver(text)
        (images, labels), = _batches(solver.net, 1, 5)
        solver.net.blobs["data"].data[...] = images
        solver.net.blobs["label"].data[...] = labels
        solver.step(4)
        assert solver.executor.state == "replay"
        cupy.transfers.clear()
        solver.step(3)
        assert cupy.transfers["to_host"] == 1
        solver.net.blobs["data"].data[...] = np.full_like(images, np.nan)
        with pytest.raises(TrainingError, match="iteration 7: the loss is nan"):
            solver.step(2)


def test_deferred_flags_are_kept_per_array_module_and_device():
    """A check deferred at one site by arrays of two places (host NumPy and the device here;
    two GPUs' slices in a real run) keeps a flag for each: neither is ORed into the other's
    memory. Either flag set raises the site's error."""
    from owlnet import device_checks
    with fakecupy.fake_gpu() as cupy:
        device_checks.defer("layer: labels", np.asarray(False), lambda: DataError("host"))
        device_checks.defer("layer: labels", cupy.asarray(np.asarray(True)),
                            lambda: DataError("device"))
        assert len(device_checks._flags) == 2
        with pytest.raises(DataError, match="device"):
            device_checks.raise_pending()
        device_checks.raise_pending()           # the flag was cleared when it raised

"""The training step on one GPU, captured as CUDA graphs once and replayed.

:class:`CapturedStep` runs the same work as :class:`~.executors.SingleDevice`, with fewer
launches from Python: after one eager warm-up iteration it captures, on its own
non-blocking CuPy stream, graph A (clear the diffs, forward and backward of every layer after
the feed) and graph B (the update), and from then on replays them. (``WARM_UP`` eager
iterations precede the capture.) Two graphs, not one,
because the solver's contract puts the display, ``on_gradients`` callbacks and the learning
rate's log line between backward and update; the extra launch costs microseconds.

What a replay cannot see, and how it is handled:

* The feed (the leading layers without bottoms: data layers reading a source on the host,
  Input, DummyData) runs eagerly before each replay, on the capture stream, so its
  host-to-device copies are ordered before graph A reads its tops.
* Numbers that change per iteration are device scalars the kernels read when they run: the
  iteration (:attr:`DeviceScalars.iteration`, uint64, for counter-based random numbers:
  ``kernels.gpu.dropout_forward_counted``) and each learning group's rate
  (``UpdateRule.group_rates``, computed on the host as on the CPU, written with one ``fill``
  per group before graph B), so the results equal the eager step's bit for bit.
* Host writes to blobs (pycaffe's ``blob.data[...] = x`` between steps) are uploaded before
  each replay (``blob.device_current``), which also marks the host copies stale after it.
* Loss: graph A writes the iteration's loss into slot ``iteration % LOSS_RING`` of a device
  ring; the executor hands the solver a view of that slot, so the deferred loss check
  (``solver.LossCheck``, at most ``LossCheck.limit`` < ``LOSS_RING`` losses pending) reads
  each iteration's own value at display time. Label checks are deferred the same way
  (``owlnet.device_checks``).

Memory: nothing is allocated from the device inside a capture. The warm-up iterations and
both captures allocate from a memory pool private to this executor (``using_allocator``), so
the warm-up leaves in that pool a free block for every temporary the captured code asks for
again (same code, same sizes, same order; two iterations, because from the second on a layer
allocates its new cached arrays while still holding the previous ones). A capture's
temporaries, and the layer caches an eager call replaces later, go back to the private pool,
which only this executor's warm-ups and captures use, so no other array gets an address a
graph holds. The pool is kept, never emptied, for the executor's life, and so are the shared
convolution workspaces the graphs use (``kernels.gpu.workspace_buffers``), even if eager code
grows the workspace later. ``new_bytes`` counts what the pool took from the device during
the captures (0 expected; CuPy captures in relaxed mode, which would allow it).

A net that cannot be captured runs eagerly, with one log line naming why
(:func:`capture_blockers`, or the layer whose capture failed: a host sync, a host-to-device
copy, a Python layer).
"""
from __future__ import annotations

import contextlib
import time

from .. import backend, device_checks, kernels
from .. import logging as owl_logging
from ..blob import device_current
from .executors import SingleDevice

#: Eager iterations before the capture: the second one allocates as the steady state does
#: (a layer's new cache taken while its previous one is still held).
WARM_UP = 2
#: Slots of the device ring of per-iteration losses (more than ``LossCheck.limit``).
LOSS_RING = 1024
#: Layer types whose forward or backward runs host code on device values.
HOST_LAYERS = ("Python",)


def feed_size(net) -> int:
    """The number of leading layers without bottoms (the feed, run eagerly)."""
    count = 0
    for bottoms in net.bottom_names.values():
        if bottoms:
            break
        count += 1
    return count


def capture_blockers(net, solver_param, callbacks=()) -> list:
    """Why this train net and solver cannot be captured (empty: they can)."""
    reasons = []
    if solver_param.iter_size > 1:
        reasons.append(f"iter_size is {solver_param.iter_size} (the captured step holds one "
                       "forward/backward)")
    if solver_param.clip_gradients >= 0:
        reasons.append("clip_gradients reads the gradient norm on the host")
    if callbacks:
        reasons.append("solver callbacks (add_callback) run host code between backward and "
                       "the update")
    if solver_param.average_loss >= LOSS_RING:
        reasons.append(f"average_loss {solver_param.average_loss} keeps more losses than the "
                       f"device ring holds ({LOSS_RING})")
    start = feed_size(net)
    bottoms = list(net.bottom_names.values())
    for index, layer in enumerate(net.layers[start:], start=start):
        if layer.type in HOST_LAYERS:
            reasons.append(f"layer '{layer.name}' ({layer.type}) cannot be captured")
        elif not bottoms[index]:
            reasons.append(f"layer '{layer.name}' ({layer.type}) has no bottoms but follows "
                           "layers that have (only the leading ones run before the replay)")
    return reasons


class DeviceScalars:
    """The values a replay reads from the device: the iteration (uint64: the device's
    ``kernels.gpu.iteration_counter``, which counter-based random kernels read, written by
    ``kernels.gpu.iteration_draws``) and the learning groups' rates (float64), written before
    each replay."""

    def __init__(self, xp, groups: int):
        self.kernels = kernels.get(xp)      # kernels.gpu, loaded on first GPU use
        self.iteration = self.kernels.iteration_counter()
        self.rates = xp.zeros(groups, dtype=xp.float64)
        self.rate_views = [self.rates[g] for g in range(groups)]

    def set_rates(self, rates) -> None:
        for view, rate in zip(self.rate_views, rates):
            view.fill(rate)


class CaptureFailed(Exception):
    """A capture that CUDA or owlnet refused; the message says where."""


class CapturedStep(SingleDevice):
    """:class:`SingleDevice`'s work as replayed CUDA graphs (see the module docstring)."""

    def __init__(self, net, rule):
        super().__init__(net, rule)
        cupy = backend.import_cupy()
        self.cupy = cupy
        self.kernels = kernels.get(cupy)    # kernels.gpu
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pool = cupy.cuda.MemoryPool()
        self.feed = feed_size(net)
        self.scalars = DeviceScalars(cupy, len(net.arena.learned))
        self.losses = cupy.zeros(LOSS_RING, dtype=net.arena.data.dtype)
        self.blobs = list(dict.fromkeys(list(net.blobs.values()) + list(net.learnable_params)))
        self.state = "warm-up"          # -> "capture" -> "replay"; "eager" after a failure
        self.reason = None              # why it fell back
        self.warm_up_left = WARM_UP
        self.forward_graph = self.update_graph = None
        self.layout = None              # _layout() at the capture
        self.new_bytes = 0              # device memory the pool took during captures
        self.held = []                  # workspaces the graphs use (kept alive with them)

    # -- scopes ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self):
        """The solver's step runs inside: every launch, eager or captured, on this stream
        (which first waits for the work queued on the default stream, as the default stream
        then waits for it), and device checks deferred while graphs run."""
        null = self.cupy.cuda.Stream.null
        self.stream.wait_event(null.record())
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.stream)
            if self.state != "eager":
                stack.enter_context(device_checks.deferred())
            yield
        null.wait_event(self.stream.record())

    def _layout(self):
        """What the graphs depend on: each blob's shape and device memory."""
        return [(blob.shape, blob.device_data.data.ptr, blob.device_diff.data.ptr)
                for blob in self.blobs]

    def _private(self):
        return self.cupy.cuda.using_allocator(self.pool.malloc)

    def _capture(self, work, what):
        """Capture ``work()`` on the stream; the graph, or CaptureFailed naming ``what``.
        ``new_bytes`` adds what the pool took from the device meanwhile (0 when the warm-up
        left every block the capture needs)."""
        stream = self.stream
        total = self.pool.total_bytes()
        with self._private(), _add_growth(self, total):
            stream.begin_capture()
            try:
                work()
            except Exception as exc:            # noqa: BLE001 - any refusal means eager
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise CaptureFailed(f"{what()} cannot be captured ({type(exc).__name__}: "
                                    f"{exc})") from exc
            graph = stream.end_capture()
        self.held += self.kernels.workspace_buffers()
        return graph

    def _fall_back(self, reason: str) -> None:
        owl_logging.info(f"Training step runs eagerly: {reason}")
        self.reason = reason
        self.state = "eager"
        self.forward_graph = self.update_graph = None

    # -- the iteration -----------------------------------------------------------------------
    def clear_param_diffs(self):
        if self.state == "eager":       # else the step's work clears them (``_step_work``)
            self.net.clear_param_diffs()

    def forward_backward(self, iteration, reduce):
        with self.scalars.kernels.iteration_draws(iteration):
            return self._iteration(iteration)

    def _iteration(self, iteration):
        net = self.net
        if self.feed:
            net.forward_range(0, self.feed - 1)        # layers without bottoms: no loss
        if self.state == "eager":
            return self._forward_backward()
        if self.state == "warm-up":
            return self._warm_up(iteration)
        device_current(self.blobs)
        if self.state == "replay" and self._layout() != self.layout:
            owl_logging.info("Training step: the net's shapes or arrays changed; capturing "
                             "it again")
            self.state, self.warm_up_left = "warm-up", WARM_UP
            self.forward_graph = self.update_graph = None
            return self._warm_up(iteration)
        if self.state == "capture":
            self.layout = self._layout()
            current = {"layer": None}
            try:
                self.forward_graph = self._capture(
                    lambda: self._step_work(current),
                    lambda: _describe(current["layer"]))
            except CaptureFailed as exc:
                self._fall_back(str(exc))
                net.clear_param_diffs()
                return self._forward_backward()
        self.forward_graph.launch(self.stream)
        return self.losses[iteration % LOSS_RING]

    def _forward_backward(self):
        last = len(self.net.layers) - 1
        loss = self.net.forward_range(self.feed, last)
        self.net.backward_range(last, 0)
        return loss

    def _warm_up(self, iteration):
        """One eager warm-up iteration of graph A's work, from the private pool."""
        with self._private():
            self._step_work({"layer": None})
        return self.losses[iteration % LOSS_RING]

    def _step_work(self, current):
        """Graph A's work, layer by layer or fused step by step as the eager step runs it
        (``Net.segments``; ``current`` names the (first) layer being run). The
        warm-ups run it eagerly and the capture records it: the same code, so the capture
        asks the pool for the same temporaries, in the same order, with the same arrays live
        (the loss sum included) as the warm-up did."""
        net, last = self.net, len(self.net.layers) - 1
        current["layer"] = None
        net.clear_param_diffs()
        loss = 0.0
        for first, end, _ in net.segments(self.feed, last):
            current["layer"] = net.layers[first]
            part = net.forward_range(first, end)
            if type(part) is not float:
                loss = loss + part
        for first, end, _ in net.segments(0, last, backward=True):
            current["layer"] = net.layers[first]
            net.backward_range(end, first)
        current["layer"] = None
        self._keep_loss(loss)

    def _keep_loss(self, loss):
        """``losses[iteration % LOSS_RING] = loss``, the iteration read from its device
        scalar (no host sync)."""
        slot = (self.scalars.iteration % LOSS_RING).astype(self.cupy.int64).reshape(1)
        self.losses[slot] = loss

    def update(self, rate, iteration):
        if self.state == "eager":
            self.rule.apply(self.net, rate, iteration)
            return
        self.scalars.set_rates(self.rule.group_rates(self.net.arena, rate, iteration))
        rates = self.scalars.rate_views
        if self.state == "warm-up":
            with self._private():
                self.rule.apply(self.net, rate, iteration, group_rates=rates)
            self.warm_up_left -= 1
            if not self.warm_up_left:
                self.state = "capture"
            return
        if self.update_graph is None:
            try:
                self.update_graph = self._capture(
                    lambda: self.rule.apply(self.net, rate, iteration, group_rates=rates),
                    lambda: f"the {self.rule.type} update")
            except CaptureFailed as exc:
                self._fall_back(str(exc))
                self.rule.apply(self.net, rate, iteration)
                return
            self.state = "replay"
        self.update_graph.launch(self.stream)

    def forward_loss(self):
        with self.stream:
            return super().forward_loss()


@contextlib.contextmanager
def _add_growth(executor, total):
    try:
        yield
    finally:
        executor.new_bytes += executor.pool.total_bytes() - total


def _describe(layer) -> str:
    if layer is None:
        return "the step's bookkeeping (clearing diffs, keeping the loss)"
    return f"layer '{layer.name}' ({layer.type})"


def select(net, rule, solver_param, callbacks=()):
    """The executor of one device: :class:`CapturedStep` on the GPU when the net allows it,
    else :class:`SingleDevice` (with one log line saying why, on the GPU)."""
    if backend.mode() != "gpu":
        return SingleDevice(net, rule)
    reasons = capture_blockers(net, solver_param, callbacks)
    if reasons:
        owl_logging.info(f"Training step runs eagerly: {'; '.join(reasons)}")
        return SingleDevice(net, rule)
    return CapturedStep(net, rule)


def time_steps(net, iterations: int) -> tuple:
    """Seconds per training step of ``net`` (clear the diffs, forward, backward, an SGD update
    at rate 0, so the weights stay), run ``iterations`` times eagerly and then as replayed
    graphs after the warm-up and capture: (eager seconds, captured seconds or the reason it
    could not be captured). GPU mode."""
    from ..proto import caffe_pb2  # noqa: PLC0415
    from ..solver.updates import SGD  # noqa: PLC0415
    param = caffe_pb2.SolverParameter(base_lr=0.0)
    rule = SGD(param, net)
    reasons = capture_blockers(net, param)
    executors = [SingleDevice(net, rule)] + ([] if reasons else [CapturedStep(net, rule)])
    seconds = []
    for executor in executors:
        with backend.device_arrays(), executor.scope():
            stream = backend.import_cupy().cuda.get_current_stream()
            untimed = WARM_UP + 1 if isinstance(executor, CapturedStep) else 1
            for iteration in range(untimed + iterations):
                if iteration == untimed:
                    stream.synchronize()
                    start = time.perf_counter()
                executor.clear_param_diffs()
                executor.forward_backward(iteration, reduce=True)
                executor.update(0.0, iteration)
            stream.synchronize()
            seconds.append((time.perf_counter() - start) / iterations)
    if reasons:
        return seconds[0], "; ".join(reasons)
    return seconds[0], seconds[1] if executors[1].state == "replay" else executors[1].reason

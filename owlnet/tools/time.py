"""`owlnet time MODEL [--iterations N] [--gpu IDX] [--batch B] [--phase TRAIN|TEST]`.

Also Caffe's spelling: ``owlnet time -model M [-iterations N] [-gpu IDX] [-phase P]
[-stage A,B] [-level N]``.

Per-layer forward and backward timing, as Caffe's ``caffe time``: the net is built (TRAIN
phase by default), run once or more to warm up, then timed for N iterations of forward over
every layer followed by backward over every layer in reverse; a table of each layer's
average forward and backward milliseconds follows, with Caffe's totals ("Average Forward
pass", "Average Backward pass", "Average Forward-Backward", "Total Time").

Inputs: Input layers get standard-normal data; MemoryData layers (fed from Python, so empty
here) become DummyData of their declared shape. Data and ImageData layers read their real
sources, so data loading is timed as in Caffe; ``--data-shape C,H,W`` replaces them with
random DummyData of shape (batch, C, H, W) and zero labels, for when the source is absent.
``--batch B`` sets the first dimension of every input and the batch size of every data layer.
A net without a loss (a deploy net) is timed with ``force_backward``, so every layer runs
its backward pass; otherwise backward runs where training would run it.
On the GPU the device is synchronised before and after each layer's timing; the device is
chosen by ``--gpu`` / ``--device`` (owlnet.tools.device; one GPU, as Caffe's time). There, in
the TRAIN phase, a last line gives the whole training step's time (forward, backward, an SGD
update at rate 0) run eagerly and as replayed CUDA graphs (``owlnet.parallel.captured``).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from .. import backend
from .. import config
from .. import layer_types
from .. import logging as owl_logging
from .. import memory
from ..errors import ConfigError, DataError
from ..net import TEST, TRAIN, Net
from ..proto import caffe_pb2
from . import add_python_layers_flag, device, run_command
from .flags import FlagParser

_PHASES = {"TRAIN": TRAIN, "TEST": TEST}
_SOURCE_LAYERS = ("Data", "ImageData")


def build_parser() -> FlagParser:
    p = FlagParser(prog="owlnet time", description=__doc__.splitlines()[0])
    p.add_argument("model_file", nargs="?", metavar="MODEL", help="net prototxt")
    p.add_argument("--model", metavar="MODEL", help="net prototxt (Caffe's spelling)")
    p.add_argument("--iterations", type=int, default=50, metavar="N",
                   help="timed iterations (default 50, as Caffe)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed forward-backward passes first (default 1)")
    device.add_device_flags(p)
    p.add_argument("--batch", type=int, metavar="B", help="batch size of every input/data layer")
    p.add_argument("--phase", choices=tuple(_PHASES), default="TRAIN")
    p.add_argument("--stage", metavar="A[,B...]", help="net stages")
    p.add_argument("--level", type=int, default=0, metavar="N", help="net level")
    p.add_argument("--weights", metavar="W.caffemodel", help="load these weights first")
    p.add_argument("--data-shape", metavar="C,H,W",
                   help="replace Data/ImageData layers by random inputs of this shape")
    add_python_layers_flag(p)
    return p


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--data-shape takes three positive integers C,H,W, got '{text}'")
    return shape


def _dummy_layer(lp, shapes, fillers):
    """A DummyData layer standing in for ``lp`` with the same name and tops."""
    dummy = caffe_pb2.LayerParameter(name=lp.name, type="DummyData")
    dummy.top.extend(lp.top)
    dummy.include.extend(lp.include)
    dummy.exclude.extend(lp.exclude)
    for shape, filler in zip(shapes, fillers):
        dummy.dummy_data_param.shape.add().dim.extend(shape)
        dummy.dummy_data_param.data_filler.add().CopyFrom(filler)
    return dummy


def prepare_net_param(param, batch=None, data_shape=None):
    """The NetParameter to time: batch sizes overridden, unreadable inputs replaced by
    DummyData stand-ins of constant zeros (filled once: :func:`_fill_inputs` writes random
    data into them, so the timed forward does not draw a batch of random numbers on the
    host each pass, which no data layer does)."""
    zeros = caffe_pb2.FillerParameter(type="constant", value=0.0)
    layers = []
    for lp in param.layer:
        if lp.type == "MemoryData":
            m = lp.memory_data_param
            n = batch or m.batch_size
            lp = _dummy_layer(lp, [(n, m.channels, m.height, m.width), (n,)][:len(lp.top)],
                              [zeros, zeros])
        elif lp.type in _SOURCE_LAYERS and data_shape is not None:
            source = lp.data_param if lp.type == "Data" else lp.image_data_param
            n = batch or source.batch_size
            lp = _dummy_layer(lp, [(n,) + data_shape, (n,)][:len(lp.top)], [zeros, zeros])
        elif batch is not None:
            lp = _with_batch(lp, batch)
        layers.append(lp)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    out.layer.extend(layers)
    if not any(lp.loss_weight or layer_types.layer_class(lp.type, lp.name).is_loss for lp in out.layer):
        out.force_backward = True
    return out


def _with_batch(lp, batch):
    """A copy of ``lp`` whose input/data shape has batch size ``batch``."""
    copy = caffe_pb2.LayerParameter()
    copy.CopyFrom(lp)
    if copy.type == "Input":
        for shape in copy.input_param.shape:
            if len(shape.dim):
                shape.dim[0] = batch
    elif copy.type == "DummyData":
        for shape in copy.dummy_data_param.shape:
            if len(shape.dim):
                shape.dim[0] = batch
        p = copy.dummy_data_param
        p.num[:] = [batch] * len(p.num)
    elif copy.type == "Data":
        copy.data_param.batch_size = batch
    elif copy.type == "ImageData":
        copy.image_data_param.batch_size = batch
    return copy


def _synchroniser(gpu):
    """A function that waits for the device to finish its queued work (nothing on the CPU)."""
    if gpu is not None:
        return backend.import_cupy().cuda.Device().synchronize
    return lambda: None


def benchmark(net, iterations: int, warmup: int, sync):
    """Per-layer forward/backward seconds summed over ``iterations`` timed passes, and the
    wall time of each pass."""
    last = len(net.layers) - 1
    for _ in range(warmup):
        net.forward_range(0, last)
        net.backward_range(last, 0)
    forward = [0.0] * len(net.layers)
    backward = [0.0] * len(net.layers)
    passes = []
    for _ in range(iterations):
        sync()
        start = time.perf_counter()
        for li in range(len(net.layers)):
            t0 = time.perf_counter()
            net.forward_range(li, li)
            sync()
            forward[li] += time.perf_counter() - t0
        for li in range(last, -1, -1):
            t0 = time.perf_counter()
            net.backward_range(li, li)
            sync()
            backward[li] += time.perf_counter() - t0
        passes.append(time.perf_counter() - start)
    return forward, backward, passes


def _fill_inputs(net, stand_ins=()):
    """Standard-normal values in the net's Input blobs and the first top of each stand-in
    layer named in ``stand_ins``, except the targets of loss and Accuracy layers (any bottom
    after the first), which stay 0 as in Caffe's zeroed blobs: class 0 is a valid label for
    every classifier."""
    copied_from = {}                    # a Split's top -> the blob it copies
    targets = set()
    for layer, bottoms, tops in zip(net.layers, net.bottom_names.values(),
                                    net.top_names.values()):
        if layer.type == "Split":
            copied_from.update((top, bottoms[0]) for top in tops)
        elif layer.is_loss or layer.type == "Accuracy":
            targets.update(copied_from.get(name, name) for name in bottoms[1:])
    rng = backend.rng()
    for name in list(net.inputs) + [net.top_names[layer][0] for layer in stand_ins]:
        blob = net.blobs[name]
        values = np.zeros(blob.shape) if name in targets else rng.standard_normal(blob.shape)
        blob.data[...] = backend.to_device(values.astype(blob.data.dtype))


def report(net, forward, backward, passes, out) -> None:
    """Caffe's per-iteration lines, per-layer averages and totals."""
    n = len(passes)
    names = list(net.layer_dict)
    width = max([len("layer")] + [len(name) for name in names])
    type_width = max([len("type")] + [len(layer.type) for layer in net.layers])
    for i, seconds in enumerate(passes, start=1):
        print(f"Iteration: {i} forward-backward time: {seconds * 1e3:.6g} ms.", file=out)
    print("Average time per layer:", file=out)
    print(f"{'layer':<{width}}  {'type':<{type_width}}  {'forward ms':>12}  {'backward ms':>12}",
          file=out)
    for name, layer, fwd, bwd in zip(names, net.layers, forward, backward):
        print(f"{name:<{width}}  {layer.type:<{type_width}}  {fwd / n * 1e3:>12.6g}  "
              f"{bwd / n * 1e3:>12.6g}", file=out)
    print(f"Average Forward pass: {sum(forward) / n * 1e3:.6g} ms.", file=out)
    print(f"Average Backward pass: {sum(backward) / n * 1e3:.6g} ms.", file=out)
    print(f"Average Forward-Backward: {sum(passes) / n * 1e3:.6g} ms.", file=out)
    print(f"Total Time: {sum(passes) * 1e3:.6g} ms.", file=out)


def run(args, out=None) -> int:
    """Build and time the parsed command line's net; prints the report to ``out``."""
    out = out or sys.stdout
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must not be negative, got {args.warmup}")
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    if args.model and args.model_file:
        raise ConfigError("give the net as MODEL or as --model, not both")
    model = args.model or args.model_file
    if not model:
        raise ConfigError("need a model definition to time: MODEL or --model=M")
    data_shape = _parse_shape(args.data_shape) if args.data_shape else None
    param, _ = config.read_net(model)
    types = {lp.name: lp.type for lp in param.layer}
    param = prepare_net_param(param, args.batch, data_shape)
    stand_ins = [lp.name for lp in param.layer
                 if lp.type == "DummyData" and types.get(lp.name) != "DummyData"]
    owl_logging.ensure_configured()
    gpu = device.setup_from_args(args, log_cpu=True)[0]
    stages = tuple(s for s in (args.stage or "").split(",") if s)
    try:
        net = Net(param, phase=_PHASES[args.phase], weights=args.weights, level=args.level,
                  stages=stages)
    except DataError as exc:
        if data_shape is None and any(lp.type in _SOURCE_LAYERS for lp in param.layer):
            raise DataError(f"{exc} (give --data-shape C,H,W to time with random inputs "
                            "instead)") from None
        raise
    _fill_inputs(net, [name for name in stand_ins if name in net.layer_dict])
    where = "CPU" if gpu is None else f"GPU {gpu}"
    print(f"Timing net '{net.name}' ({model}) on {where}, phase {args.phase}, "
          f"{args.iterations} iterations", file=out)
    forward, backward, passes = benchmark(net, args.iterations, args.warmup,
                                          _synchroniser(gpu))
    report(net, forward, backward, passes, out)
    print(memory.memory_line(net), file=out)
    if gpu is not None and args.phase == "TRAIN":
        from ..parallel.captured import time_steps  # noqa: PLC0415
        eager, graphs = time_steps(net, args.iterations)
        graphs = (f"{graphs * 1e3:.6g} ms" if isinstance(graphs, float)
                  else f"not captured ({graphs})")
        print(f"Training step: eager {eager * 1e3:.6g} ms, captured {graphs}.", file=out)
    return 0


def main(argv=None) -> int:
    return run_command("owlnet time", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())

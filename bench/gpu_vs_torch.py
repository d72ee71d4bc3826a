"""Training speed on one GPU: owlnet's Solver.step against PyTorch eager and PyTorch + CUDA graph.

    python3 bench/gpu_vs_torch.py [--models alexnet_nogroup,resnet20,...] [--math fp32,tf32]
                                  [--batch 128] [--iterations 20] [--budget SECONDS]

In one process on one card, for each net of issue 11's table (AlexNet as one tower
``models/alexnet_nogroup``; BVLC CaffeNet and BVLC GoogLeNet with its three loss heads from
the Caffe model zoo, ``--zoo``, else the project's copies in ``models/``; ResNet-20/56/110
from ``models/``) and each math mode (``fp32``: strict float32, no TF32 in cuBLAS or cuDNN;
``tf32``), the TRAIN net with its data layers
replaced by an Input layer of the crop size at ``--batch`` (random images and labels, filled
once) is trained by:

* owlnet: ``Solver.step(n)``, the real step (clear diffs, forward, backward, SGD update with
  Caffe's lr_mult/decay_mult; losses read at the end of ``step``), activation memory reuse on
  unless ``--no-reuse-memory``;
* PyTorch eager: the same net built from the owlnet Net by :func:`torch_model` (same blob graph,
  same initial weights), ``torch.optim.SGD`` with the same rates, ``cudnn.benchmark`` on
  (owlnet's cuDNN autotune on too; ``--autotune off`` runs both on the heuristics' plans);
* PyTorch + CUDA graph: that model's whole iteration (forward, backward, step) captured once
  and replayed (PyTorch's whole-network capture recipe).

SGD: base_lr 0.01, momentum 0.9, weight decay 5e-4. Each figure is the median over ``--rounds``
rounds of ``--iterations`` iterations (device synchronised around each round) after
``--warmup`` iterations. Peak memory: what CuPy's memory pool holds after owlnet's run (freed
before it; the pool keeps every block until freed, so this is its high-water mark), and
``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) for each PyTorch run.

``--budget SECONDS`` bounds the whole run: cases run in the order given and one that would
start with less than its estimated cost left is reported as not run. Needs a CUDA device with
CuPy, PyTorch and nvidia-cudnn-frontend; ``--help`` and the converter (used on the CPU by
tests/test_torch_convert.py) work without a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZOO = ROOT.parent / "shared" / "caffe-zoo" / "models"

#: name -> (prototxt relative to models/ or, with "zoo:", to --zoo (models/<name> when the
#: zoo is absent: the project's copy of that net); input C, H, W; seconds a case costs beyond
#: its timed iterations, a guess for --budget)
MODELS = {
    "alexnet_nogroup": ("alexnet_nogroup/train_val.prototxt", (3, 227, 227), 20),
    "caffenet": ("zoo:bvlc_reference_caffenet/train_val.prototxt", (3, 227, 227), 20),
    "googlenet": ("zoo:bvlc_googlenet/train_val.prototxt", (3, 224, 224), 60),
    "resnet20": ("resnet20/train_val.prototxt", (3, 32, 32), 15),
    "resnet56": ("resnet56/train_val.prototxt", (3, 32, 32), 25),
    "resnet110": ("resnet110/train_val.prototxt", (3, 32, 32), 40),
}
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
DATA_LAYERS = ("Data", "ImageData", "MemoryData", "DummyData", "Input", "HDF5Data", "WindowData")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--math", default="fp32,tf32", help="fp32, tf32 or both, comma-separated")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iterations", type=int, default=20, help="iterations per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=0, help="seconds for the whole run (0: none)")
    p.add_argument("--autotune", choices=("on", "off"), default="on",
                   help="time every cuDNN plan per shape and keep the fastest: owlnet's "
                        "OWLNET_CUDNN_AUTOTUNE and PyTorch's cudnn.benchmark together "
                        "(default on)")
    p.add_argument("--zoo", type=Path, default=DEFAULT_ZOO,
                   help="the Caffe model zoo's models/ folder (CaffeNet, GoogLeNet)")
    p.add_argument("--no-reuse-memory", action="store_true",
                   help="owlnet without activation memory reuse")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: a smoke test of this script (no CUDA graph column)")
    return p


def model_path(name: str, zoo: Path = DEFAULT_ZOO) -> Path:
    relative = MODELS[name][0]
    if relative.startswith("zoo:"):
        path = Path(zoo) / relative[4:]
        return path if path.is_file() else ROOT / "models" / name / "train_val.prototxt"
    return ROOT / "models" / relative


# -- the nets ---------------------------------------------------------------------------------
def train_net_param(path, batch: int, shape):
    """The TRAIN NetParameter of ``path`` with one Input layer (data, label) for its data layers."""
    from owlnet import config
    from owlnet.proto import caffe_pb2
    param, source = config.read_net(str(path))
    state = config.make_state(param, caffe_pb2.TRAIN)
    param, _ = config.filter_net(param, state, source)
    out = caffe_pb2.NetParameter(name=param.name)
    data = caffe_pb2.LayerParameter(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add().dim.extend((batch,) + tuple(shape))
    data.input_param.shape.add().dim.extend([batch])
    out.layer.append(data)
    out.layer.extend(lp for lp in param.layer if lp.type not in DATA_LAYERS)
    return out


def solver_param(net_param, seed: int = 1):
    from owlnet.proto import caffe_pb2
    p = caffe_pb2.SolverParameter(base_lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  lr_policy="fixed", max_iter=10 ** 9, display=0, snapshot=0,
                                  snapshot_after_train=False, random_seed=seed, type="SGD")
    p.net_param.CopyFrom(net_param)
    return p


# -- the PyTorch side: a converter from a built owlnet Net ------------------------------------
def torch_model(net, device):
    """A torch.nn.Module computing ``net``'s weighted loss from {"data", "label"} tensors, with
    ``net``'s current weights. ``module.specs`` lists (parameter, lr_mult, decay_mult) of the
    learnable parameters, from the net's own resolved multipliers."""
    import torch

    from owlnet import backend

    learnable = {id(blob): i for i, blob in enumerate(net.learnable_params)}

    class Converted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.steps, self.specs = [], []
            self.weights = torch.nn.ParameterList()
            for (name, layer), bottoms, tops in zip(net.layer_dict.items(),
                                                     net.bottom_names.values(),
                                                     net.top_names.values()):
                params = []
                if layer.type != "BatchNorm":      # its statistics are not learned by SGD
                    for blob in layer.blobs:
                        i = learnable[id(blob)]
                        p = torch.nn.Parameter(torch.as_tensor(
                            backend.to_host(blob.data).copy(), device=device))
                        self.weights.append(p)
                        self.specs.append((p, net.params_lr[i], net.params_weight_decay[i]))
                        params.append(p)
                self.steps.append((name, layer, bottoms, tops, params))

        def forward(self, blobs):
            blobs = dict(blobs)
            for name, layer, bottoms, tops, params in self.steps:
                out = run_layer(name, layer, [blobs[b] for b in bottoms], params, len(tops))
                for t, value in zip(tops, out):
                    blobs[t] = value
            return sum(weight * blobs[b] for b, weight in net.blob_loss_weights.items() if weight)

    return Converted().to(device)


def run_layer(name, layer, x, params, n_tops):
    """The tops of one owlnet layer computed by PyTorch, as a list."""
    import torch
    import torch.nn.functional as F

    from owlnet.proto import caffe_pb2

    kind, p = layer.type, layer.param
    bias = params[1] if len(params) > 1 else None
    if kind == "Input":
        return []
    if kind == "Convolution":
        return [F.conv2d(x[0], params[0], bias, layer.stride, layer.pad, layer.dilation,
                         layer.group)]
    if kind == "InnerProduct":
        if layer.transpose or layer.axis != 1:
            raise NotImplementedError(f"{name}: only axis 1 without transpose")
        return [F.linear(x[0].flatten(1), params[0], bias)]
    if kind == "ReLU":
        slope = p.relu_param.negative_slope
        return [F.leaky_relu(x[0], slope) if slope else F.relu(x[0])]
    if kind == "Pooling":
        kernel = tuple(x[0].shape[2:]) if layer.global_pooling else tuple(layer.kernel)
        if layer.method == caffe_pb2.PoolingParameter.MAX:
            return [F.max_pool2d(x[0], kernel, layer.stride, layer.pad,
                                 ceil_mode=layer.ceil_mode)]
        return [F.avg_pool2d(x[0], kernel, layer.stride, layer.pad, ceil_mode=layer.ceil_mode,
                             count_include_pad=True)]
    if kind == "LRN":
        q = p.lrn_param
        if q.norm_region != caffe_pb2.LRNParameter.ACROSS_CHANNELS:
            raise NotImplementedError(f"{name}: only ACROSS_CHANNELS LRN")
        return [F.local_response_norm(x[0], q.local_size, q.alpha, q.beta, q.k)]
    if kind == "Dropout":
        return [F.dropout(x[0], p.dropout_param.dropout_ratio, training=True)]
    if kind == "BatchNorm":
        return [F.batch_norm(x[0], None, None, training=True, eps=p.batch_norm_param.eps)]
    if kind == "Scale":
        shape = (1, -1) + (1,) * (x[0].dim() - 2)
        out = x[0] * params[0].view(shape)
        return [out + bias.view(shape) if bias is not None else out]
    if kind == "Eltwise":
        op = p.eltwise_param.operation
        if op == caffe_pb2.EltwiseParameter.SUM:
            coeffs = list(p.eltwise_param.coeff) or [1.0] * len(x)
            return [sum(c * t for c, t in zip(coeffs, x))]
        out = x[0]
        for t in x[1:]:
            out = out * t if op == caffe_pb2.EltwiseParameter.PROD else torch.maximum(out, t)
        return [out]
    if kind == "Concat":
        return [torch.cat(x, dim=layer.axis)]
    if kind == "Split":
        return [x[0]] * n_tops
    if kind == "Flatten":
        return [x[0].flatten(1)]
    if kind == "Softmax":
        return [F.softmax(x[0], dim=1)]
    if kind == "SoftmaxWithLoss":
        q = p.loss_param
        ignore = q.ignore_label if q.HasField("ignore_label") else -100
        return [F.cross_entropy(x[0], x[1].long(), ignore_index=ignore)]
    if kind == "Accuracy":
        return [torch.zeros((), device=x[0].device)] * n_tops
    raise NotImplementedError(f"layer '{name}': no PyTorch conversion for type {kind}")


def torch_optimizer(model):
    import torch
    groups = [{"params": [p], "lr": BASE_LR * lr, "weight_decay": WEIGHT_DECAY * decay}
              for p, lr, decay in model.specs if lr != 0]
    return torch.optim.SGD(groups, lr=BASE_LR, momentum=MOMENTUM)


class Torch:
    """PyTorch eager training of the converted net."""

    def __init__(self, net, images, labels, device):
        import torch
        self.model = torch_model(net, device)
        self.inputs = {"data": torch.as_tensor(images, device=device),
                       "label": torch.as_tensor(labels, device=device)}
        self.optimizer = torch_optimizer(self.model)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(self.inputs)
        loss.backward()
        self.optimizer.step()
        return loss


class TorchGraph(Torch):
    """The eager iteration captured as one CUDA graph after a warm-up on a side stream."""

    def __init__(self, net, images, labels, device, warmup: int = 3):
        import torch
        super().__init__(net, images, labels, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                Torch.step(self)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            loss = self.model(self.inputs)
            loss.backward()
            self.optimizer.step()
        self.loss = loss

    def step(self):
        self.graph.replay()
        return self.loss


# -- timing -----------------------------------------------------------------------------------
def time_ms(step, iterations, rounds, warmup, sync) -> float:
    """Median over rounds of the mean milliseconds per call."""
    for _ in range(warmup):
        step()
    sync()
    means = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        sync()
        means.append((time.perf_counter() - start) / iterations * 1e3)
    return statistics.median(means)


def run_case(name, math, args, device):
    """One row: {"owlnet": (ms, MiB), "eager": (ms, MiB, MiB reserved), "graph": ...}; a
    PyTorch column may hold an error instead. On the CPU (``--device cpu``, a smoke test of
    this script) there is no graph column and memory is the blobs' bytes (owlnet) or 0."""
    import torch

    from owlnet import backend, memory

    gpu = device.type == "cuda"
    backend.set_math_mode(math)
    torch.backends.cudnn.allow_tf32 = math == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = math == "tf32"
    if gpu:
        import cupy
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
    os.environ["OWLNET_REUSE_MEMORY"] = "0" if args.no_reuse_memory else "1"
    solver, images, labels = owlnet_solver(name, args.batch, args.zoo)

    def sync_owl():
        if gpu:
            cupy.cuda.Device().synchronize()

    def sync_torch():
        if gpu:
            torch.cuda.synchronize(device)

    # Solver.step(n) is the unit: n iterations per call, one call per round.
    ms = time_ms(lambda: solver.step(args.iterations), 1, args.rounds, 1,
                 sync_owl) / args.iterations
    held = pool.total_bytes() if gpu else sum(memory.net_bytes(solver.net).values())
    row = {"owlnet": (ms, held / 2**20)}
    runners = (("eager", Torch), ("graph", TorchGraph)) if gpu else (("eager", Torch),)
    for label, cls in runners:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runner = None
        try:
            runner = cls(solver.net, images, labels, device)
            ms = time_ms(runner.step, args.iterations, args.rounds, args.warmup, sync_torch)
            row[label] = (ms, torch.cuda.max_memory_allocated(device) / 2**20 if gpu else 0.0,
                          torch.cuda.max_memory_reserved(device) / 2**20 if gpu else 0.0)
        except Exception as exc:   # a model PyTorch cannot capture still gets its other columns
            row[label] = f"failed: {type(exc).__name__}: {exc}"[:120]
        del runner
    del solver
    if gpu:
        pool.free_all_blocks()
    return row


def owlnet_solver(name, batch: int, zoo: Path = DEFAULT_ZOO):
    """``(solver, images, labels)``: owlnet's SGD solver for the TRAIN net of ``name`` at
    ``batch``, its data and label blobs filled once with :func:`random_batch`."""
    import owlnet
    from owlnet import backend
    shape = MODELS[name][1]
    solver = owlnet.get_solver(solver_param(train_net_param(model_path(name, zoo), batch, shape)))
    images, labels = random_batch(solver.net, batch, shape)
    with backend.device_arrays():
        solver.net.blobs["data"].data[...] = backend.to_device(images)
        solver.net.blobs["label"].data[...] = backend.to_device(labels)
    return solver, images, labels


def random_batch(net, batch: int, shape, seed: int = 0):
    """Standard-normal images and labels below the class count of ``net``'s first loss."""
    import numpy as np
    loss = next(layer for layer in net.layer_dict if net.layer_dict[layer].type ==
                "SoftmaxWithLoss")
    classes = net.blobs[net.bottom_names[loss][0]].shape[1]
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch,) + tuple(shape)).astype(np.float32)
    return images, rng.integers(0, classes, batch).astype(np.float32)


def format_row(name, math, row) -> list:
    owl_ms, owl_mib = row["owlnet"]
    cells = [f"{name:<16}{math:<6}{owl_ms:>10.2f}"]
    notes = []
    for label in ("eager", "graph"):
        value = row.get(label)
        if isinstance(value, tuple):
            cells.append(f"{value[0]:>10.2f}{owl_ms / value[0]:>7.2f}")
        else:
            cells.append(f"{'-':>10}{'-':>7}")
            if value is not None:
                notes.append(f"  PyTorch {label}: {value}")
    mem = "".join(f"{row[k][1]:>9.0f}" if isinstance(row.get(k), tuple) else f"{'-':>9}"
                  for k in ("eager", "graph"))
    return ["".join(cells) + f"{owl_mib:>9.0f}{mem}"] + notes


HEADER = (f"{'net':<16}{'math':<6}{'owlnet ms':>10}{'eager ms':>10}{'ratio':>7}"
          f"{'graph ms':>10}{'ratio':>7}{'owl MiB':>9}{'eagerMiB':>9}{'graphMiB':>9}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    maths = [m for m in args.math.split(",") if m]
    unknown = [n for n in names if n not in MODELS] + [m for m in maths if m not in ("fp32",
                                                                                      "tf32")]
    if unknown:
        build_parser().error(f"unknown model or math mode: {', '.join(unknown)}")
    sys.path.insert(0, str(ROOT))
    started = time.monotonic()
    import torch

    from owlnet import backend
    if args.device == "gpu":
        import cupy
        backend.set_mode_gpu()
        device = torch.device("cuda", backend.device())
        where = f"{torch.cuda.get_device_name(device)}, CuPy {cupy.__version__}"
    else:
        device, where = torch.device("cpu"), "CPU (smoke test)"
    torch.backends.cudnn.benchmark = args.autotune == "on"
    backend.set_cudnn_autotune(args.autotune == "on")
    print(f"{where}, torch "
          f"{torch.__version__} (cuDNN {torch.backends.cudnn.version()}), batch {args.batch}, "
          f"{args.rounds} rounds of {args.iterations} iterations (median), owlnet memory reuse "
          f"{'off' if args.no_reuse_memory else 'on'}, cuDNN autotune {args.autotune}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("ratio = owlnet ms / PyTorch ms (below 1: owlnet faster); MiB: peak device memory "
          "(owlnet: CuPy pool held; PyTorch: max_memory_allocated)", flush=True)
    print(HEADER, flush=True)
    for math in maths:
        for name in names:
            cost = MODELS[name][2]
            left = args.budget - (time.monotonic() - started) if args.budget else None
            if left is not None and left < cost:
                print(f"{name:<16}{math:<6}not run: {left:.0f} s of the budget left, "
                      f"needs ~{cost} s", flush=True)
                continue
            if not model_path(name, args.zoo).is_file():
                print(f"{name:<16}{math:<6}not run: {model_path(name, args.zoo)} missing "
                      "(--zoo)", flush=True)
                continue
            path = model_path(name, args.zoo)
            if MODELS[name][0].startswith("zoo:") and path.is_relative_to(ROOT / "models"):
                print(f"  ({name}: not in {args.zoo}, timing the project's copy "
                      f"{path.relative_to(ROOT)})", flush=True)
            case_start = time.monotonic()
            try:
                row = run_case(name, math, args, device)
            except Exception as exc:
                print(f"{name:<16}{math:<6}owlnet failed: {type(exc).__name__}: {exc}"[:300],
                      flush=True)
                continue
            for line in format_row(name, math, row):
                print(line, flush=True)
            print(f"  ({time.monotonic() - case_start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

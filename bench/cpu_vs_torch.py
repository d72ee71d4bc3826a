"""CPU training: owlnet (NumPy) against PyTorch on the same nets, weights and batch.

One training step is ``Solver.step(1)`` in owlnet (forward, backward, SGD with momentum 0.9,
weight decay 5e-4, learning rate 1e-4 (random data must not diverge), each parameter's lr_mult
and decay_mult) on the net's TRAIN prototxt with its data layer replaced by in-memory inputs; in PyTorch the same layers (bench/caffe_to_torch.py
builds them from the owlnet net), ``zero_grad``, forward, ``backward`` and ``torch.optim.SGD``
with the same per-parameter rates.

Nets: LeNet, cifar10_quick, ResNet-20 (BatchNorm+Scale residual), BVLC AlexNet, and the
SqueezeNet-style and MobileNet v1 / v2-style nets of bench/cpu_nets.py. Before timing, each
net is checked: both engines run one forward/backward in float64 without Dropout from the same
weights, and the loss (within 1e-9) and every parameter gradient (within 1e-7 of the blob's
largest) must agree. In float32 a single ReLU input within rounding of 0 can open in one engine
and not the other, which BatchNorm's backward then spreads over a whole channel.

Timing: for a few rounds, each engine runs in a fresh process of its own (the order alternating
between rounds), runs ``--warmup`` steps and times ``--iters`` more; the process's figure is
its median and each engine keeps its best over the rounds (the machine is shared: other work
slows single runs by up to 2x). Both use ``--threads`` threads.

PyTorch is used here only, never by owlnet (``pip install torch==2.13.0``).

    python bench/cpu_vs_torch.py [--nets lenet resnet20 ...] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE)]
import cpu_nets  # noqa: E402

BASE_LR, MOMENTUM, WEIGHT_DECAY = 1e-4, 0.9, 5e-4
BATCH = {"lenet": 64, "cifar10_quick": 32, "resnet20": 32, "squeezenet": 4, "alexnet": 4,
         "mobilenet_v1": 4, "mobilenet_v2": 4}
CLASSES = {"lenet": 10, "cifar10_quick": 10, "resnet20": 10}
NETS = tuple(BATCH)
ENGINES = ("owlnet", "torch")


# -- one engine in its own process ------------------------------------------------------------
def _owlnet_solver(text, weights):
    import owlnet  # noqa: PLC0415
    from google.protobuf import text_format  # noqa: PLC0415
    from owlnet.proto import caffe_pb2  # noqa: PLC0415
    param = caffe_pb2.SolverParameter(base_lr=BASE_LR, momentum=MOMENTUM,
                                      weight_decay=WEIGHT_DECAY, lr_policy="fixed",
                                      max_iter=10 ** 9, display=0, snapshot=0,
                                      snapshot_after_train=False, random_seed=1, type="SGD")
    text_format.Parse(text, param.net_param)
    solver = owlnet.SGDSolver(param)
    solver.net.copy_from(weights)
    return solver


def worker(args):
    import numpy as np  # noqa: PLC0415  (after the thread variables are set)
    import owlnet  # noqa: PLC0415
    folder = Path(args.net_dir)
    data, label = np.load(folder / "data.npy"), np.load(folder / "label.npy")
    weights = str(folder / "weights.caffemodel")
    if args.check:
        # The same math in float64 in both engines: no float32 rounding decides a ReLU.
        with owlnet.backend.dtype_scope(np.float64):
            net = owlnet.Net((folder / "check.prototxt").read_text(), weights, owlnet.TRAIN)
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = label
    if args.worker == "owlnet":
        version = owlnet.__file__
        if args.check:
            net.clear_param_diffs()
            loss = net.forward_backward()
            grads = [b.diff for b in net.learnable_params]
        else:
            solver = _owlnet_solver((folder / "train.prototxt").read_text(), weights)
            solver.net.blobs["data"].data[...] = data
            solver.net.blobs["label"].data[...] = label

            def step():
                solver.step(1)
    else:
        import torch  # noqa: PLC0415
        import caffe_to_torch  # noqa: PLC0415
        torch.set_num_threads(args.threads)
        version = torch.__version__
        if not args.check:
            net = owlnet.Net((folder / "train.prototxt").read_text(), weights, owlnet.TRAIN)
        twin = caffe_to_torch.TorchTwin(net, BASE_LR, MOMENTUM, WEIGHT_DECAY)
        twin.set_inputs(data=net.blobs["data"].data, label=net.blobs["label"].data)
        step = twin.step
        if args.check:
            loss = twin.forward_backward().item()
            found = twin.gradients()
            grads = [found.get(i, np.zeros(b.shape)) for i, b in enumerate(net.learnable_params)]
    if args.check:
        np.savez(folder / f"check_{args.worker}.npz", *grads, loss=loss)
        print(json.dumps({"version": version}))
        return
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1e3 * statistics.median(times), "version": version}))


# -- the files both engines read --------------------------------------------------------------
def prepare(name, folder, seed):
    """TRAIN prototxt (and one without Dropout for the check), random weights, one batch."""
    import numpy as np  # noqa: PLC0415
    import owlnet  # noqa: PLC0415
    folder.mkdir(parents=True, exist_ok=True)
    batch = BATCH[name]
    text = cpu_nets.train_text(name, batch)
    (folder / "train.prototxt").write_text(text)
    (folder / "check.prototxt").write_text(cpu_nets.train_text(name, batch, drop_dropout=True))
    rng = np.random.default_rng(seed)
    net = owlnet.Net(text, owlnet.TRAIN)
    cpu_nets.randomize(net, rng)
    net.save(str(folder / "weights.caffemodel"))
    data = net.blobs["data"]
    np.save(folder / "data.npy", rng.standard_normal(data.shape).astype(np.float32))
    classes = CLASSES.get(name, 1000)
    np.save(folder / "label.npy", rng.integers(0, classes, batch).astype(np.float32))


def check(folder):
    """Relative loss difference and the largest difference of a gradient blob relative to its
    largest value, both engines in float64. A blob whose gradient is zero in exact arithmetic
    (a bias followed only by convolution and BatchNorm) holds rounding noise in both engines,
    so the scale is at least 1e-6 of the net's largest gradient."""
    import numpy as np  # noqa: PLC0415
    owl, ref = (np.load(folder / f"check_{e}.npz") for e in ENGINES)
    loss_error = abs(float(owl["loss"]) - float(ref["loss"])) / abs(float(ref["loss"]))
    keys = [key for key in owl.files if key != "loss"]
    floor = 1e-6 * max(float(np.max(np.abs(ref[key]))) for key in keys)
    grad_error = max(float(np.max(np.abs(owl[key] - ref[key])))
                     / max(float(np.max(np.abs(ref[key]))), floor) for key in keys)
    return loss_error, grad_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--owlnet-root", help="directory whose owlnet package is timed")
    parser.add_argument("--baseline-root", help="an earlier checkout whose owlnet is timed in "
                        "the same rounds (before/after columns)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--net-dir", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(1, str(ROOT))       # this checkout's owlnet writes the files
    import numpy as np  # noqa: PLC0415
    root = args.owlnet_root or ROOT
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} UTC; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (shared machine: other work slows both engines; best of "
          f"{args.rounds} rounds kept); Python {platform.python_version()}, numpy "
          f"{np.__version__}; {args.threads} threads, median of {args.iters} steps after "
          f"{args.warmup} per process")
    checks = {}
    with tempfile.TemporaryDirectory(prefix="owlnet_bench_") as tmp:
        folders = {name: Path(tmp) / name for name in args.nets}
        for seed, name in enumerate(args.nets):
            prepare(name, folders[name], seed)
            for engine in ENGINES:
                cpu_nets.run_worker(__file__, engine, folders[name], args.threads, root,
                                    "--check")
            checks[name] = check(folders[name])
            loss_error, grad_error = checks[name]
            print(f"{name}: loss differs by {loss_error:.1e} (relative), gradients by "
                  f"{grad_error:.1e} (largest, relative to each blob's largest; float64)", flush=True)
            if loss_error > 1e-9 or grad_error > 1e-7:
                sys.exit(f"{name}: owlnet and torch disagree; the timings would compare "
                         "different work")
        best, versions = cpu_nets.best_of_rounds(__file__, ENGINES, folders, args.rounds,
                                                 args.threads, root, "--iters", args.iters,
                                                 "--warmup", args.warmup,
                                                 baseline_root=args.baseline_root)
    print(f"torch {versions['torch']}; owlnet from {versions['owlnet']}")
    print(cpu_nets.ratio_table(args.nets, best, "torch", versions,
                               {name: f"{BATCH[name]:>5}" for name in args.nets}, "batch"))


if __name__ == "__main__":
    main()

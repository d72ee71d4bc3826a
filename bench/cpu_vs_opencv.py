"""CPU inference: owlnet (NumPy) against OpenCV's dnn module on the same deploy nets and weights.

For each net (BVLC AlexNet and GoogLeNet from ../shared/caffe-zoo or models/, cifar10_full,
ResNet-56 with BatchNorm+Scale, and the MobileNet v1 / v2 and SqueezeNet-style nets written in
bench/cpu_nets.py) the script writes the deploy prototxt, random weights as a .caffemodel
(He-scaled Gaussians; BatchNorm statistics drawn too) and one input batch. Then, for a few
rounds, it runs each engine in a fresh process of its own (the order alternating between
rounds), which loads the files, runs ``--warmup`` forwards and times ``--iters`` more; the
process's figure is its median. Each engine keeps its best figure over the rounds (the machine
is shared, and a single run can be slowed by other work). Both engines use ``--threads``
threads. The class scores (the final Softmax's input) of the two engines are compared, so that the table compares equal work.

    python bench/cpu_vs_opencv.py [--nets alexnet googlenet ...] [--rounds 3] [--threads 2]

``--owlnet-root DIR`` times the owlnet found in DIR instead of this checkout's (for a
before/after comparison against another worktree).
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
NETS = ("alexnet", "googlenet", "cifar10_full", "resnet56", "mobilenet_v1", "mobilenet_v2",
        "squeezenet")
ENGINES = ("owlnet", "opencv")


# -- one engine in its own process ------------------------------------------------------------
def worker(args):
    import numpy as np  # noqa: PLC0415  (after the thread variables are set)
    folder = Path(args.net_dir)
    x = np.load(folder / "input.npy")
    logits = (folder / "logits.txt").read_text()
    if args.worker == "opencv":
        import cv2  # noqa: PLC0415
        cv2.setNumThreads(args.threads)
        net = cv2.dnn.readNetFromCaffe(str(folder / "deploy.prototxt"),
                                       str(folder / "weights.caffemodel"))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def run():
            net.setInput(x)
            return net.forward(logits)
        version = cv2.__version__
    else:
        import owlnet  # noqa: PLC0415
        net = owlnet.Net(str(folder / "deploy.prototxt"), str(folder / "weights.caffemodel"),
                         owlnet.TEST)
        def run():
            net.blobs["data"].data[...] = x
            net.forward()
            return net.blobs[logits].data
        version = f"{owlnet.__file__}"
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    np.save(folder / f"out_{args.worker}.npy", np.asarray(out).reshape(x.shape[0], -1))
    print(json.dumps({"ms": 1e3 * statistics.median(times), "version": version}))


# -- the files both engines read --------------------------------------------------------------
def prepare(name, folder, batch, seed):
    """Deploy prototxt, random weights (.caffemodel, written by owlnet) and an input batch."""
    import numpy as np  # noqa: PLC0415
    import owlnet  # noqa: PLC0415
    folder.mkdir(parents=True, exist_ok=True)
    text = cpu_nets.deploy_text(name, batch)
    (folder / "deploy.prototxt").write_text(text)
    rng = np.random.default_rng(seed)
    net = owlnet.Net(text, owlnet.TEST)
    cpu_nets.randomize(net, rng)
    net.save(str(folder / "weights.caffemodel"))
    # The outputs compared: the last layer's input (the class scores before Softmax, which
    # random weights can saturate), named as its producing layer, which OpenCV needs.
    logits = net.bottom_names[net.layers[-1].name][0]
    (folder / "logits.txt").write_text(logits)
    x = rng.standard_normal(net.blobs["data"].shape).astype(np.float32)
    np.save(folder / "input.npy", x)


def compare_outputs(folder):
    import numpy as np  # noqa: PLC0415
    a, b = (np.load(folder / f"out_{e}.npy").astype(np.float64) for e in ENGINES)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--owlnet-root", help="directory whose owlnet package is timed")
    parser.add_argument("--baseline-root", help="an earlier checkout whose owlnet is timed in "
                        "the same rounds (before/after columns)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--net-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(1, str(ROOT))       # this checkout's owlnet writes the files

    import numpy as np  # noqa: PLC0415
    load = os.getloadavg()[0]
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} UTC; {os.cpu_count()} cores, load average "
          f"{load:.1f} (shared machine: other work slows both engines; best of "
          f"{args.rounds} rounds kept); Python {platform.python_version()}, numpy "
          f"{np.__version__}; batch {args.batch}, {args.threads} threads, median of "
          f"{args.iters} forwards after {args.warmup} per process")
    with tempfile.TemporaryDirectory(prefix="owlnet_bench_") as tmp:
        folders = {name: Path(tmp) / name for name in args.nets}
        for seed, name in enumerate(args.nets):
            prepare(name, folders[name], args.batch, seed)
        best, versions = cpu_nets.best_of_rounds(
            __file__, ENGINES, folders, args.rounds, args.threads, args.owlnet_root or ROOT,
            "--iters", args.iters, "--warmup", args.warmup, baseline_root=args.baseline_root)
        errors = {name: compare_outputs(folders[name]) for name in args.nets}
    print(f"OpenCV {versions['opencv']}; owlnet from {versions['owlnet']}")
    print(cpu_nets.ratio_table(args.nets, best, "opencv", versions,
                               {name: f"{errors[name]:>12.1e}" for name in args.nets},
                               "max rel diff"))


if __name__ == "__main__":
    main()

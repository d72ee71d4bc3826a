"""LeNet end to end on the CPU: owlnet's tools/net_trainer.py against a PyTorch script that
follows the same protocol, each in a fresh process, timed from start to exit.

The protocol is `make demo`'s training, solvers/lenet_solver.prototxt: 2,000 iterations of 64
grey digits read from the demo's Datum LMDB (mean image subtracted, scaled by 1/256), SGD with
momentum 0.9, weight decay 5e-4 and the "inv" learning-rate policy, a test pass of 10 batches
of 100 every 500 iterations, snapshots at iterations 1,000 and 2,000. owlnet runs it as a user
does (``tools/net_trainer.py solvers/lenet_solver.prototxt --device cpu``); the PyTorch script
reads the same LMDBs in its training loop (an LMDB cursor, each Datum decoded, the same mean
and scale), trains the same layers (bench/caffe_to_torch.py builds them from LeNet's
prototxt), tests and saves at the same iterations. Rounds alternate the two engines; each keeps
its best. Both use ``--threads`` threads.

Also printed: the share of owlnet's training step spent waiting for its data layer (the Data
layer's forward, whose batches a prefetch thread decodes and transforms ahead), over 300 steps
of the same solver in one process.

Run ``make demo`` first: it writes the LMDBs and the mean under demo/.

    python bench/lenet_end_to_end.py [--rounds 2] [--threads 2] [--iterations 2000]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOLVER = ROOT / "solvers" / "lenet_solver.prototxt"
DEMO = ROOT / "demo"
BATCH, TEST_BATCH, TEST_ITERS, TEST_INTERVAL, SNAPSHOT = 64, 100, 10, 500, 1000
BASE_LR, MOMENTUM, WEIGHT_DECAY, GAMMA, POWER = 0.01, 0.9, 5e-4, 1e-4, 0.75


def _environment(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    return env


def run_owlnet(iterations, threads, snapshots):
    """Wall seconds of tools/net_trainer.py on the demo solver, process start to exit."""
    solver = Path(snapshots) / "solver.prototxt"
    text = SOLVER.read_text().replace('"demo/snapshots/lenet"', f'"{snapshots}/lenet"')
    solver.write_text(text.replace("max_iter: 2000", f"max_iter: {iterations}"))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "tools" / "net_trainer.py"), str(solver),
                    "--device", "cpu"], cwd=ROOT, env=_environment(threads), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_torch(iterations, threads, snapshots):
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--torch-worker", "--iterations", str(iterations),
                    "--threads", str(threads), "--snapshots", snapshots], cwd=ROOT,
                   env=_environment(threads), check=True)
    return time.perf_counter() - start


# -- the PyTorch script ---------------------------------------------------------------------
def torch_worker(args):
    import lmdb  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    sys.path.insert(0, str(HERE))
    import caffe_to_torch  # noqa: PLC0415
    import cpu_nets  # noqa: PLC0415
    import owlnet  # noqa: PLC0415
    from owlnet.proto import caffe_pb2  # noqa: PLC0415
    torch.set_num_threads(args.threads)
    torch.manual_seed(1701)

    mean_proto = caffe_pb2.BlobProto()
    mean_proto.ParseFromString((DEMO / "mnist_mean.binaryproto").read_bytes())
    mean = np.asarray(mean_proto.data, dtype=np.float32).reshape(1, 28, 28)

    def batches(path, size):
        """Endless batches read from an LMDB in key order, wrapping around as Caffe does."""
        env = lmdb.open(str(path), readonly=True, lock=False)
        with env.begin() as txn:
            cursor = txn.cursor()
            cursor.first()
            datum = caffe_pb2.Datum()
            while True:
                images = np.empty((size, 1, 28, 28), np.float32)
                labels = np.empty(size, np.float32)
                for i in range(size):
                    datum.ParseFromString(cursor.value())
                    pixels = np.frombuffer(datum.data, np.uint8).reshape(1, 28, 28)
                    images[i] = (pixels - mean) * 0.00390625
                    labels[i] = datum.label
                    if not cursor.next():
                        cursor.first()
                yield images, labels

    net = owlnet.Net(cpu_nets.train_text("lenet", BATCH), owlnet.TRAIN)   # fillers' weights
    twin = caffe_to_torch.TorchTwin(net, BASE_LR, MOMENTUM, WEIGHT_DECAY)
    mults = [group["lr"] / BASE_LR for group in twin.optimizer.param_groups]
    train = batches(DEMO / "mnist_train_lmdb", BATCH)
    test = batches(DEMO / "mnist_test_lmdb", TEST_BATCH)

    def test_pass():
        with torch.no_grad():
            for _ in range(TEST_ITERS):
                images, labels = next(test)
                twin.set_inputs(data=images, label=labels)
                twin.forward()

    for iteration in range(args.iterations):
        if iteration % TEST_INTERVAL == 0:
            test_pass()
        rate = BASE_LR * (1 + GAMMA * iteration) ** -POWER
        for group, mult in zip(twin.optimizer.param_groups, mults):
            group["lr"] = rate * mult
        images, labels = next(train)
        twin.set_inputs(data=images, label=labels)
        twin.step()
        if (iteration + 1) % SNAPSHOT == 0:
            torch.save({str(k): v for k, v in twin.tensor.items()},
                       Path(args.snapshots) / f"torch_iter_{iteration + 1}.pt")
    test_pass()


# -- owlnet's data share --------------------------------------------------------------------
def data_share(steps):
    """(step ms, data-layer ms) over ``steps`` steps of the demo solver, in this process."""
    os.chdir(ROOT)
    import logging  # noqa: PLC0415
    import owlnet  # noqa: PLC0415
    owlnet.logging.configure(level=logging.WARNING)
    solver = owlnet.get_solver(str(SOLVER))
    net = solver.net
    data = list(net.layer_dict).index("mnist")
    spent, started = [0.0], [0.0]

    def before(li):
        if li == data:
            started[0] = time.perf_counter()

    def after(li):
        if li == data:
            spent[0] += time.perf_counter() - started[0]

    net.before_forward(before)
    net.after_forward(after)
    solver.step(20)
    spent[0] = 0.0
    start = time.perf_counter()
    solver.step(steps)
    total = time.perf_counter() - start
    return 1e3 * total / steps, 1e3 * spent[0] / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args)
    if not (DEMO / "mnist_train_lmdb").exists():
        sys.exit("lenet_end_to_end: run `make demo` first (it writes demo/mnist_*_lmdb)")
    import numpy as np  # noqa: PLC0415
    print(f"date {time.strftime('%Y-%m-%d %H:%M')} UTC; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}, numpy "
          f"{np.__version__}; {args.threads} threads; {args.iterations} iterations, best of "
          f"{args.rounds} rounds", flush=True)
    best = {"owlnet": float("inf"), "torch": float("inf")}
    runners = {"owlnet": run_owlnet, "torch": run_torch}
    for r in range(args.rounds):
        order = ("owlnet", "torch") if r % 2 == 0 else ("torch", "owlnet")
        for engine in order:
            with tempfile.TemporaryDirectory(prefix="owlnet_e2e_") as snapshots:
                seconds = runners[engine](args.iterations, args.threads, snapshots)
            best[engine] = min(best[engine], seconds)
            print(f"round {r + 1}: {engine} {seconds:.1f} s", flush=True)
    owl, ref = best["owlnet"], best["torch"]
    print(f"\nowlnet {owl:.1f} s, torch {ref:.1f} s, ratio {owl / ref:.2f}x")
    step_ms, data_ms = data_share(300)
    print(f"owlnet step {step_ms:.2f} ms, of which waiting for the Data layer {data_ms:.2f} ms "
          f"({100 * data_ms / step_ms:.1f}%)")


if __name__ == "__main__":
    main()

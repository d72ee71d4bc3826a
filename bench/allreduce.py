"""Gradient reduction on one GPU: what owlnet.parallel's reducers cost, measured.

1. ``reduce``: a flat float32 buffer of ``--params`` elements (default 61M, AlexNet's
   gradients) summed by a 1-rank NCCL all-reduce (the call owlnet's NCCLReducer makes, on a
   side stream) and by a local device sum ``a += b`` (what LocalReducer does per extra slice);
   median of ``--rounds`` rounds of ``--iterations`` calls, timed with CUDA events, with the
   bandwidth each implies. A 1-rank all-reduce moves no data between GPUs: it measures NCCL's
   fixed cost and on-device copy, the floor under a real ring.
2. ``slices``: a full SGD iteration of a model-zoo TRAIN net (``--model``, its data layer
   replaced by an LMDB of random images written to a temporary folder) at global batch
   ``--batch``, with N logical slices on the one GPU (``DataParallel`` with devices [0]*N:
   N smaller forward/backward passes plus the local sum) against N = 1.

Needs a CUDA device with CuPy (NCCL included in cupy's wheels via nvidia-nccl); ``--help``
works without them. Prints one line per measurement.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=61_000_000, help="gradient elements")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="alexnet_nogroup", help="model for the slices test")
    p.add_argument("--batch", type=int, default=128, help="global batch for the slices test")
    p.add_argument("--slices", default="1,2,4", help="N values for the slices test")
    p.add_argument("--skip-slices", action="store_true", help="only the reduce test")
    return p


def event_timed_ms(cupy, step, iterations, rounds):
    """Median over rounds of the mean time of ``step`` in ms (CUDA events)."""
    times = []
    for _ in range(rounds):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(iterations):
            step()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / iterations)
    return statistics.median(times)


def reduce_test(args, cupy) -> None:
    from cupy.cuda import nccl
    size = args.params
    a = cupy.ones(size, dtype=cupy.float32)
    b = cupy.ones(size, dtype=cupy.float32)
    (comm,) = nccl.NcclCommunicator.initAll([0])
    stream = cupy.cuda.get_current_stream()

    def allreduce():
        comm.allReduce(a.data.ptr, a.data.ptr, size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)

    def local_sum():
        a.__iadd__(b)

    nbytes = size * 4
    for name, step, moved in (("NCCL all-reduce, 1 rank", allreduce, 2 * nbytes),
                              ("local sum a += b", local_sum, 3 * nbytes)):
        step()
        ms = event_timed_ms(cupy, step, args.iterations, args.rounds)
        print(f"reduce  {name:26s} {size / 1e6:.1f}M fp32: {ms:8.3f} ms "
              f"({moved / ms / 1e6:.0f} GB/s of memory traffic)")
    comm.destroy()


def write_random_lmdb(path, count, shape, seed=0):
    from owlnet.data.datum import array_to_datum
    from owlnet.data.db import LMDBWriter
    rng = np.random.default_rng(seed)
    with LMDBWriter(str(path)) as db:
        for i in range(count):
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            db.put(f"{i:08d}".encode(), array_to_datum(image, i % 1000).SerializeToString())


def slices_test(args, cupy) -> None:
    from gpu_vs_torch import MODELS, train_net_param

    from owlnet import backend, parallel
    from owlnet.proto import caffe_pb2
    from owlnet.solver import get_solver

    shape = MODELS[args.model]
    folder = Path(tempfile.mkdtemp(prefix="owlnet_allreduce_"))
    write_random_lmdb(folder / "lmdb", 2 * args.batch, shape)
    net = train_net_param(args.model, args.batch)
    data = caffe_pb2.LayerParameter(name="data", type="Data", top=["data", "label"])
    data.data_param.source = str(folder / "lmdb")
    data.data_param.batch_size = args.batch
    data.data_param.backend = caffe_pb2.DataParameter.LMDB
    data.transform_param.scale = 1 / 256
    del net.layer[0]
    net.layer.insert(0, data)
    solver_param = caffe_pb2.SolverParameter(net_param=net, base_lr=0.001, momentum=0.9,
                                             weight_decay=5e-4, lr_policy="fixed",
                                             max_iter=10**9, display=0, random_seed=1,
                                             snapshot_after_train=False)
    backend.set_mode_gpu()
    baseline = None
    for n in (int(v) for v in args.slices.split(",")):
        solver = get_solver(solver_param)
        if n > 1:
            solver.parallel = parallel.DataParallel(solver, [0] * n)
            solver.parallel.synchronize()
        solver.step(2)                                   # warm up: cuDNN plans, memory pool
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            solver.step(args.iterations)
            cupy.cuda.Device().synchronize()
            times.append((time.perf_counter() - start) / args.iterations * 1e3)
        ms = statistics.median(times)
        baseline = baseline or ms
        print(f"slices  {args.model} batch {args.batch}, N = {n} logical slices on one GPU: "
              f"{ms:8.2f} ms/iter ({ms / baseline:.2f} x N = 1)")
        if solver.parallel is not None:
            solver.parallel.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from owlnet import backend
    cupy = backend.import_cupy()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    reduce_test(args, cupy)
    if not args.skip_slices:
        slices_test(args, cupy)
    return 0


if __name__ == "__main__":
    sys.exit(main())

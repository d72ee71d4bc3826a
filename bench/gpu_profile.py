"""Where owlnet's GPU training step spends its time, and what each cuDNN plan of a convolution costs.

    python3 bench/gpu_profile.py [--models resnet20,alexnet_nogroup] [--math fp32]
                                 [--plans alexnet|resnet|none]

For each net (the TRAIN net of bench/gpu_vs_torch.py at batch 128, random inputs): wall ms per
``Solver.step``, then ``parallel.captured.time_steps`` (the step eager, then captured) under PyTorch's profiler,
which records the CUDA kernels of the process, CuPy's and cuDNN's too: device ms and the
kernels that take it, heaviest first. ``--plans``: for the convolutions of AlexNet or ResNet-20
at batch 128, every cuDNN engine plan the heuristics offer for fprop, dgrad and wgrad, with its
workspace and time (the lowest index that builds is the heuristics' choice, what owlnet runs
without autotune). ``--autotune on`` profiles the nets with owlnet's cuDNN autotune. Device only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_vs_torch as bench  # noqa: E402

#: (input, weights, output, pad, stride) at batch 128
PLAN_SHAPES = {
    "alexnet": [((128, 3, 227, 227), (96, 3, 11, 11), (128, 96, 55, 55), 0, 4),
                ((128, 96, 27, 27), (256, 96, 5, 5), (128, 256, 27, 27), 2, 1),
                ((128, 256, 13, 13), (384, 256, 3, 3), (128, 384, 13, 13), 1, 1),
                ((128, 384, 13, 13), (384, 384, 3, 3), (128, 384, 13, 13), 1, 1),
                ((128, 384, 13, 13), (256, 384, 3, 3), (128, 256, 13, 13), 1, 1)],
    "resnet": [((128, 16, 32, 32), (16, 16, 3, 3), (128, 16, 32, 32), 1, 1),
               ((128, 32, 16, 16), (32, 32, 3, 3), (128, 32, 16, 16), 1, 1),
               ((128, 64, 8, 8), (64, 64, 3, 3), (128, 64, 8, 8), 1, 1)],
}


def profile_net(name, math, iterations):
    import cupy
    from torch.profiler import ProfilerActivity, profile

    from owlnet import backend
    backend.set_mode_gpu()
    backend.set_math_mode(math)
    solver = bench.owlnet_solver(name, 128)[0]
    solver.step(5)
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    solver.step(iterations)
    cupy.cuda.Device().synchronize()
    wall = (time.perf_counter() - start) / iterations * 1e3
    from owlnet.parallel.captured import time_steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager, captured = time_steps(solver.net, iterations)
        cupy.cuda.Device().synchronize()
    events = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in events) / iterations / 1e3
    captured = f"{captured * 1e3:.2f} ms" if isinstance(captured, float) else captured
    print(f"== {name} {math}: Solver.step {wall:.2f} ms; time_steps: eager {eager * 1e3:.2f} ms, "
          f"captured {captured}; profiled device time {device_ms:.2f} ms per eager + "
          "captured step pair (kernels inside graph replays are counted where CUPTI sees them)")
    print(events.table(sort_by="self_device_time_total", row_limit=30,
                       max_name_column_width=90))
    del solver
    cupy.get_default_memory_pool().free_all_blocks()


def time_plans(family, math):
    import cupy

    from owlnet import backend
    from owlnet.kernels import gpu
    cudnn = gpu.cudnn_module()
    backend.set_mode_gpu()
    handle = gpu._handle(cudnn, cupy)
    for x_shape, w_shape, y_shape, pad, stride in PLAN_SHAPES[family]:
        for kind in ("fprop", "dgrad", "wgrad"):
            geometry = gpu.ConvGeometry(kind, x_shape, w_shape, y_shape, (pad, pad),
                                        (stride, stride), (1, 1), 1, ("profile",))
            graph, tensors = gpu.define_graph(cudnn, handle, geometry)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            if math == "fp32":
                graph.deselect_numeric_notes([cudnn.numerical_note.TENSOR_CORE])
            graph.check_support()
            count = graph.get_execution_plan_count()
            shapes = {"fprop": (x_shape, w_shape, y_shape), "dgrad": (y_shape, w_shape, x_shape),
                      "wgrad": (x_shape, y_shape, w_shape)}[kind]
            arrays = [cupy.random.standard_normal(s, dtype=cupy.float32) for s in shapes]
            pointers = {t: a.data.ptr for t, a in zip(tensors, arrays)}
            rows = []
            for index in range(count):
                try:
                    graph.build_plan_at_index(index)
                    size = graph.get_workspace_size_plan_at_index(index)
                    if size > 4 << 30:
                        rows.append(f"{index}: workspace {size >> 20} MiB, not run")
                        continue
                    space = cupy.empty(max(size, 1), cupy.uint8)
                    for _ in range(2):
                        graph.execute_plan_at_index(pointers, space.data.ptr, index, handle=handle)
                    begin, end = cupy.cuda.Event(), cupy.cuda.Event()
                    begin.record()
                    for _ in range(5):
                        graph.execute_plan_at_index(pointers, space.data.ptr, index, handle=handle)
                    end.record()
                    end.synchronize()
                    ms = cupy.cuda.get_elapsed_time(begin, end) / 5
                    rows.append(f"{index}: {ms:.3f} ms, workspace {size >> 20} MiB "
                                f"({graph.get_plan_name_at_index(index)})")
                except Exception:  # noqa: BLE001 deselected (tensor cores in fp32) or unbuildable
                    continue
            print(f"-- {kind} x {x_shape} w {w_shape} ({math}): {len(rows)} of {count} plans "
                  "build")
            print("   " + "\n   ".join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,alexnet_nogroup")
    p.add_argument("--math", default="fp32")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--plans", default="none", choices=("alexnet", "resnet", "none"))
    p.add_argument("--autotune", choices=("on", "off"), default="on")
    args = p.parse_args()
    sys.path.insert(0, str(bench.ROOT))
    from owlnet import backend
    backend.set_cudnn_autotune(args.autotune == "on")
    for name in filter(None, args.models.split(",")):
        profile_net(name, args.math, args.iterations)
    if args.plans != "none":
        time_plans(args.plans, args.math)


if __name__ == "__main__":
    main()

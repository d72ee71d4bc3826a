"""LeNet training speed on the CPU: owlnet (NumPy) against PyTorch, same threads, one process.

One training iteration is LeNet's TRAIN net at batch 64 (conv20 5x5 -> max pool 2 -> conv50 5x5
-> max pool 2 -> ip500 -> ReLU -> ip10 -> SoftmaxWithLoss): clear the gradients, forward,
backward, and an SGD step with momentum 0.9, weight decay 5e-4 and Caffe's lr_mult 2 on biases.
Both frameworks start from the same weights and see the same batch. Before timing, the script
checks that they agree: the loss, every gradient, and the weights after three SGD steps.

Timing runs owlnet and torch in alternating blocks of iterations in this one process, so that
other load on the machine slows both alike; each cell is the median over all timed iterations,
and the ratio is owlnet / torch. Three phases are timed: forward alone (autograd recording in
torch, as a training forward), forward + backward, and the full iteration.

PyTorch is used here only, never by owlnet (``pip install torch threadpoolctl``). For numbers
that mean something, run with OpenBLAS's own processor detection::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/cpu_vs_torch.py
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import owlnet  # noqa: E402
from owlnet.proto import caffe_pb2  # noqa: E402
from owlnet.solver import updates  # noqa: E402

BATCH = 64
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4

LENET_TRAIN = f"""
name: "LeNet"
layer {{ name: "data" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: {BATCH} dim: 1 dim: 28 dim: 28 }} shape {{ dim: {BATCH} }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 }}
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
LAYERS = ("conv1", "conv2", "ip1", "ip2")


# -- the two trainers ------------------------------------------------------------------------
class OwlnetLeNet:
    def __init__(self, images, labels):
        self.net = owlnet.Net(LENET_TRAIN, owlnet.TRAIN)
        self.net.blobs["data"].data[...] = images
        self.net.blobs["label"].data[...] = labels
        solver = caffe_pb2.SolverParameter(base_lr=BASE_LR, momentum=MOMENTUM,
                                           weight_decay=WEIGHT_DECAY)
        self.rule = updates.SGD(solver, self.net)
        self.last = len(self.net.layers) - 1

    def forward(self):
        return self.net.forward_range(0, self.last)

    def forward_backward(self):
        self.net.clear_param_diffs()
        return self.net.forward_backward()

    def iteration(self):
        loss = self.forward_backward()
        self.rule.apply(self.net, BASE_LR, 0)
        return loss

    def arrays(self, which):
        return {f"{name}.{i}": getattr(blob, which)
                for name in LAYERS for i, blob in enumerate(self.net.params[name])}


class TorchLeNet:
    def __init__(self, images, labels, weights):
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(800, 500), torch.nn.ReLU(), torch.nn.Linear(500, 10))
        modules = [m for m in self.model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        self.named = {}
        with torch.no_grad():
            for name, module in zip(LAYERS, modules):
                module.weight.copy_(torch.from_numpy(weights[f"{name}.0"]))
                module.bias.copy_(torch.from_numpy(weights[f"{name}.1"]))
                self.named[f"{name}.0"], self.named[f"{name}.1"] = module.weight, module.bias
        weights_group = [p for key, p in self.named.items() if key.endswith(".0")]
        biases_group = [p for key, p in self.named.items() if key.endswith(".1")]
        # Caffe's lr_mult 2 on biases; weight decay on both, as Caffe's decay_mult 1.
        self.optimizer = torch.optim.SGD(
            [{"params": weights_group, "lr": BASE_LR}, {"params": biases_group, "lr": 2 * BASE_LR}],
            lr=BASE_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.criterion = torch.nn.CrossEntropyLoss()

    def forward(self):
        return self.criterion(self.model(self.images), self.labels)

    def forward_backward(self):
        self.optimizer.zero_grad()
        loss = self.forward()
        loss.backward()
        return loss

    def iteration(self):
        loss = self.forward_backward()
        self.optimizer.step()
        return loss

    def arrays(self, which):
        return {key: (p.detach() if which == "data" else p.grad).numpy()
                for key, p in self.named.items()}


# -- checks and timing -----------------------------------------------------------------------
def max_relative_error(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def check_agreement(owl, tch):
    """Loss, gradients and weights after 3 SGD steps agree to float32 precision."""
    loss_owl = float(owl.forward_backward())
    loss_torch = tch.forward_backward().item()
    grad_errors = [max_relative_error(g, tch.arrays("grad")[k])
                   for k, g in owl.arrays("diff").items()]
    owl.rule.apply(owl.net, BASE_LR, 0)
    tch.optimizer.step()
    for _ in range(2):
        owl.iteration()
        tch.iteration()
    weight_errors = [max_relative_error(w, tch.arrays("data")[k])
                     for k, w in owl.arrays("data").items()]
    loss_error = abs(loss_owl - loss_torch) / abs(loss_torch)
    print(f"correctness: loss owlnet {loss_owl:.7f}  torch {loss_torch:.7f}  "
          f"(relative difference {loss_error:.1e}); max relative gradient difference "
          f"{max(grad_errors):.1e}; weights after 3 SGD steps {max(weight_errors):.1e}")
    ok = loss_error < 1e-5 and max(grad_errors) < 1e-4 and max(weight_errors) < 1e-5
    if not ok:
        sys.exit("owlnet and torch disagree: the timings below would compare different work")


def timed(step, iterations):
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def compare(owl, tch, phase, rounds, block):
    """Median ms per call of ``phase`` for both, alternating blocks of ``block`` calls."""
    owl_step, torch_step = getattr(owl, phase), getattr(tch, phase)
    timed(owl_step, block)                              # warm-up
    timed(torch_step, block)
    owl_times, torch_times, round_ratios = [], [], []
    for _ in range(rounds):
        o, t = timed(owl_step, block), timed(torch_step, block)
        owl_times += o
        torch_times += t
        round_ratios.append(statistics.median(o) / statistics.median(t))
    owl_ms = 1e3 * statistics.median(owl_times)
    torch_ms = 1e3 * statistics.median(torch_times)
    return owl_ms, torch_ms, min(round_ratios), max(round_ratios)


def blas_description():
    libs = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, "
            f"{i['num_threads']} threads, {Path(i['filepath']).name})"
            for i in threadpool_info()]
    return "; ".join(libs)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks per cell")
    parser.add_argument("--block", type=int, default=10, help="iterations per block")
    args = parser.parse_args(argv)

    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; Python {platform.python_version()}, "
          f"numpy {np.__version__}, torch {torch.__version__}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, load average {load:.1f} (other work on the "
          "cores slows both frameworks; the ratio is the figure to read)")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    print(f"thread pools: {blas_description()}")

    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH).astype(np.float32)
    owlnet.set_random_seed(1701)
    reference = OwlnetLeNet(images, labels)
    check_agreement(reference, TorchLeNet(images, labels, reference.arrays("data")))

    owlnet.set_random_seed(1701)
    owl = OwlnetLeNet(images, labels)
    tch = TorchLeNet(images, labels, owl.arrays("data"))
    phases = (("forward", "fprop"), ("forward_backward", "fprop+bprop"),
              ("iteration", "train iteration"))
    print(f"\nLeNet batch {BATCH}, median ms per call over {args.rounds} alternating blocks of "
          f"{args.block} (ratio range: per-block medians)")
    print(f"{'threads':>7}  {'phase':<16} {'owlnet ms':>10} {'torch ms':>10} {'ratio':>7}  "
          f"{'range':>11}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            for method, label in phases:
                owl_ms, torch_ms, low, high = compare(owl, tch, method, args.rounds, args.block)
                print(f"{threads:>7}  {label:<16} {owl_ms:>10.2f} {torch_ms:>10.2f} "
                      f"{owl_ms / torch_ms:>6.2f}x  {low:.2f}-{high:.2f}", flush=True)


if __name__ == "__main__":
    main()

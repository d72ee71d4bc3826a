"""Training speed on one GPU: owlnet (CuPy + cuDNN graphs) against PyTorch eager, one process.

The net is a model-zoo TRAIN net (``models/<model>/train_val.prototxt``) with its data layers
replaced by Input blobs of the model's crop size at ``--batch`` (default 128), filled once
with random images and labels, so only the network is timed. The PyTorch model is built
from the same owlnet Net by a small converter below (layer by layer, same blob graph, same
initial weights), with ``torch.backends.cudnn.benchmark = True``. Both run in one math mode:
``fp32`` (strict float32: no TF32 in cuBLAS or cuDNN) or ``tf32``.

Three phases, each timed over ``--iterations`` iterations in ``--rounds`` alternating rounds
(median of the rounds' means, device synchronised around each round): forward alone
(``fprop``), forward and backward (``fprop+bprop``), and the full iteration with the SGD
update (momentum 0.9, weight decay 5e-4, Caffe's lr_mult/decay_mult). Printed in ms with
the ratio owlnet / PyTorch, then the peak device memory: bytes held by CuPy's memory pool
for owlnet, ``torch.cuda.max_memory_allocated`` for PyTorch.

Needs a CUDA device with CuPy, PyTorch and (for owlnet's cuDNN path) nvidia-cudnn-frontend;
``--help`` works without them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: model -> input (C, H, W) of its TRAIN net
MODELS = {
    "alexnet_nogroup": (3, 227, 227),
    "googlenet": (3, 224, 224),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "resnet110": (3, 32, 32),
}
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
_DATA_LAYERS = ("Data", "ImageData", "MemoryData", "DummyData", "Input")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=tuple(MODELS), default="alexnet_nogroup")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--math", choices=("fp32", "tf32"), default="fp32")
    p.add_argument("--iterations", type=int, default=10, help="iterations per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    return p


# -- the owlnet side -------------------------------------------------------------------------
def train_net_param(model: str, batch: int):
    """The model's TRAIN NetParameter with one Input layer (data, label) for its data layers."""
    from owlnet import config
    from owlnet.proto import caffe_pb2
    param, _ = config.read_net(str(ROOT / "models" / model / "train_val.prototxt"))
    state = config.make_state(param, caffe_pb2.TRAIN)
    param, _ = config.filter_net(param, state)
    out = caffe_pb2.NetParameter(name=param.name)
    source = caffe_pb2.LayerParameter(name="data", type="Input", top=["data", "label"])
    source.input_param.shape.add().dim.extend((batch,) + MODELS[model])
    source.input_param.shape.add().dim.extend([batch])
    out.layer.append(source)
    out.layer.extend(lp for lp in param.layer if lp.type not in _DATA_LAYERS)
    return out


class Owlnet:
    def __init__(self, param, images, labels):
        import owlnet
        from owlnet.proto import caffe_pb2
        from owlnet.solver import updates
        self.net = owlnet.Net(param, owlnet.TRAIN)
        self.net.blobs["data"].data[...] = images
        self.net.blobs["label"].data[...] = labels
        solver = caffe_pb2.SolverParameter(base_lr=BASE_LR, momentum=MOMENTUM,
                                           weight_decay=WEIGHT_DECAY)
        self.rule = updates.SGD(solver, self.net)
        self.last = len(self.net.layers) - 1
        self.iter = 0

    def forward(self):
        self.net.forward_range(0, self.last)

    def forward_backward(self):
        self.net.clear_param_diffs()
        self.net.forward_range(0, self.last)
        self.net.backward_range(self.last, 0)

    def iteration(self):
        self.forward_backward()
        self.rule.apply(self.net, BASE_LR, self.iter)
        self.iter += 1

    def loss(self):
        return float(self.net.forward_range(0, self.last))


# -- the PyTorch side: a converter from the built owlnet Net -------------------------------
def torch_model(net, device):
    """A torch.nn.Module computing ``net``'s weighted loss from {"data", "label"} tensors,
    with ``net``'s current weights; also [(param, lr_mult, decay_mult)] for the optimiser."""
    import torch
    import torch.nn.functional as F
    from owlnet.proto import caffe_pb2

    pool = caffe_pb2.PoolingParameter

    def tensor(blob):
        from owlnet import backend
        return torch.as_tensor(backend.to_host(blob.data), device=device).clone()

    class Converted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.steps, self.specs = [], []
            self.weights = torch.nn.ParameterList()
            for (name, layer), bottoms, tops in zip(net.layer_dict.items(),
                                                      net.bottom_names.values(),
                                                      net.top_names.values()):
                params = []
                for k, blob in enumerate(layer.blobs):
                    if layer.type == "BatchNorm":
                        continue
                    p = torch.nn.Parameter(tensor(blob))
                    self.weights.append(p)
                    spec = layer.param.param[k] if k < len(layer.param.param) else None
                    self.specs.append((p, spec.lr_mult if spec else 1.0,
                                       spec.decay_mult if spec else 1.0))
                    params.append(p)
                self.steps.append((name, layer, bottoms, tops, params))

        def forward(self, blobs):
            blobs = dict(blobs)
            for name, layer, bottoms, tops, params in self.steps:
                x = [blobs[b] for b in bottoms]
                out = run_layer(name, layer, x, params)
                for t, value in zip(tops, out if isinstance(out, list) else [out]):
                    blobs[t] = value
            return sum(weight * blobs[b] for b, weight in net.blob_loss_weights.items() if weight)

    def run_layer(name, layer, x, params):
        kind, p = layer.type, layer.param
        if kind == "Input":
            return []
        if kind == "Convolution":
            return F.conv2d(x[0], params[0], params[1] if len(params) > 1 else None,
                            layer.stride, layer.pad, layer.dilation, layer.group)
        if kind == "InnerProduct":
            if layer.transpose or layer.axis != 1:
                raise NotImplementedError(f"{name}: only axis 1 without transpose")
            return F.linear(x[0].flatten(1), params[0], params[1] if len(params) > 1 else None)
        if kind == "ReLU":
            slope = p.relu_param.negative_slope
            return F.leaky_relu(x[0], slope) if slope else F.relu(x[0])
        if kind == "Pooling":
            kernel = x[0].shape[2:] if layer.global_pooling else layer.kernel
            if layer.method == pool.MAX:
                return F.max_pool2d(x[0], kernel, layer.stride, layer.pad,
                                    ceil_mode=layer.ceil_mode)
            return F.avg_pool2d(x[0], kernel, layer.stride, layer.pad,
                                ceil_mode=layer.ceil_mode, count_include_pad=True)
        if kind == "LRN":
            q = p.lrn_param
            if q.norm_region != caffe_pb2.LRNParameter.ACROSS_CHANNELS:
                raise NotImplementedError(f"{name}: only ACROSS_CHANNELS LRN")
            return F.local_response_norm(x[0], q.local_size, q.alpha, q.beta, q.k)
        if kind == "Dropout":
            return F.dropout(x[0], p.dropout_param.dropout_ratio, training=True)
        if kind == "BatchNorm":
            q = p.batch_norm_param
            return F.batch_norm(x[0], None, None, training=True, eps=q.eps)
        if kind == "Scale":
            shape = (1, -1) + (1,) * (x[0].dim() - 2)
            out = x[0] * params[0].view(shape)
            return out + params[1].view(shape) if len(params) > 1 else out
        if kind == "Eltwise":
            op = p.eltwise_param.operation
            if op == caffe_pb2.EltwiseParameter.SUM:
                coeffs = list(p.eltwise_param.coeff) or [1.0] * len(x)
                return sum(c * t for c, t in zip(coeffs, x))
            out = x[0]
            for t in x[1:]:
                out = out * t if op == caffe_pb2.EltwiseParameter.PROD else torch.maximum(out, t)
            return out
        if kind == "Concat":
            return torch.cat(x, dim=layer.axis)
        if kind == "Split":
            return [x[0]] * len(net.top_names[name])
        if kind == "Flatten":
            return x[0].flatten(1)
        if kind == "Softmax":
            return F.softmax(x[0], dim=1)
        if kind == "SoftmaxWithLoss":
            q = p.loss_param
            ignore = q.ignore_label if q.HasField("ignore_label") else -100
            return F.cross_entropy(x[0], x[1].long(), ignore_index=ignore)
        if kind == "Accuracy":
            return torch.zeros((), device=device)
        raise NotImplementedError(f"layer '{name}': no PyTorch conversion for type {kind}")

    return Converted().to(device)


class Torch:
    def __init__(self, net, images, labels, device):
        import torch
        self.torch = torch
        self.model = torch_model(net, device)
        self.inputs = {"data": torch.as_tensor(images, device=device),
                       "label": torch.as_tensor(labels, device=device)}
        groups = [{"params": [p], "lr": BASE_LR * lr, "weight_decay": WEIGHT_DECAY * decay}
                  for p, lr, decay in self.model.specs]
        self.optimizer = torch.optim.SGD(groups, lr=BASE_LR, momentum=MOMENTUM)

    def forward(self):
        self.model(self.inputs)

    def forward_backward(self):
        self.optimizer.zero_grad(set_to_none=False)
        self.model(self.inputs).backward()

    def iteration(self):
        self.forward_backward()
        self.optimizer.step()

    def loss(self):
        with self.torch.no_grad():
            return float(self.model(self.inputs))


# -- timing ----------------------------------------------------------------------------------
def timed_ms(step, iterations, sync):
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync()
    return (time.perf_counter() - start) / iterations * 1e3


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from owlnet import backend
    backend.set_math_mode(args.math)      # cuBLAS compute type and cuDNN plans follow it
    backend.set_mode_gpu()
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.math == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = args.math == "tf32"
    with backend.device_arrays():       # blob arrays are CuPy arrays in here
        compare(args, torch.device("cuda", backend.device()))
    return 0


def compare(args, device):
    """Time owlnet and PyTorch side by side and print the table."""
    import cupy
    import numpy as np
    import torch

    param = train_net_param(args.model, args.batch)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch,) + MODELS[args.model]).astype(np.float32)
    labels = rng.integers(0, 10, args.batch).astype(np.float32)
    owl = Owlnet(param, cupy.asarray(images), cupy.asarray(labels))
    tch = Torch(owl.net, images, labels, device)
    print(f"{args.model}, batch {args.batch}, math {args.math}, "
          f"{torch.cuda.get_device_name(device)}, CuPy {cupy.__version__}, "
          f"torch {torch.__version__}")
    print(f"first loss: owlnet {owl.loss():.6g}, PyTorch {tch.loss():.6g} "
          "(same weights; dropout masks differ)")

    def sync_owl():
        cupy.cuda.Device().synchronize()

    def sync_torch():
        torch.cuda.synchronize(device)

    print(f"{'phase':<14}{'owlnet ms':>12}{'PyTorch ms':>12}{'ratio':>8}")
    for phase in ("forward", "forward_backward", "iteration"):
        owl_step, torch_step = getattr(owl, phase), getattr(tch, phase)
        timed_ms(owl_step, args.warmup, sync_owl)
        timed_ms(torch_step, args.warmup, sync_torch)
        owl_ms, torch_ms = [], []
        for _ in range(args.rounds):
            owl_ms.append(timed_ms(owl_step, args.iterations, sync_owl))
            torch_ms.append(timed_ms(torch_step, args.iterations, sync_torch))
        a, b = statistics.median(owl_ms), statistics.median(torch_ms)
        label = {"forward": "fprop", "forward_backward": "fprop+bprop",
                 "iteration": "iteration"}[phase]
        print(f"{label:<14}{a:>12.2f}{b:>12.2f}{a / b:>8.2f}")
    owl_bytes = cupy.get_default_memory_pool().total_bytes()
    torch_bytes = torch.cuda.max_memory_allocated(device)
    print(f"peak memory: owlnet {owl_bytes / 2**20:.0f} MiB (CuPy pool), "
          f"PyTorch {torch_bytes / 2**20:.0f} MiB (max_memory_allocated)")


if __name__ == "__main__":
    sys.exit(main())

"""A PyTorch twin of an owlnet train net, for the training benchmark only (owlnet never uses
PyTorch): the same layers in the same order, reading each layer's settings from the owlnet
layer objects (kernel, pad, stride, dilation, group, pooling method ...) and starting from the
owlnet net's weights.

Layer types covered: Input, Split, Convolution, Pooling (MAX, AVE, global), ReLU,
InnerProduct, BatchNorm, Scale, Eltwise SUM, Concat, LRN (both regions), Dropout,
SoftmaxWithLoss. The optimizer is SGD with one parameter group per (lr_mult, decay_mult), which
is Caffe's SGD update for a fixed learning rate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from owlnet.proto import caffe_pb2

_POOL = caffe_pb2.PoolingParameter


class TorchTwin:
    def __init__(self, net, base_lr, momentum, weight_decay):
        """``net``: an owlnet TRAIN Net whose blobs hold the starting weights."""
        self.net = net
        self.tensor = {}            # id(owlnet blob) -> torch tensor (Parameter or buffer)
        groups = {}
        for blob, lr, decay in zip(net.learnable_params, net.params_lr, net.params_weight_decay):
            value = torch.from_numpy(blob.data.copy())
            if lr == 0:
                self.tensor[id(blob)] = value
                continue
            param = torch.nn.Parameter(value)
            self.tensor[id(blob)] = param
            groups.setdefault((lr, decay), []).append(param)
        for layer in net.layers:            # BatchNorm's statistics are not learnable params
            for blob in layer.blobs:
                self.tensor.setdefault(id(blob), torch.from_numpy(blob.data.copy()))
        self.optimizer = torch.optim.SGD(
            [{"params": ps, "lr": base_lr * lr, "weight_decay": weight_decay * decay}
             for (lr, decay), ps in groups.items()], lr=base_lr, momentum=momentum)
        self.inputs = {}

    def set_inputs(self, **arrays):
        self.inputs = {name: torch.from_numpy(a) for name, a in arrays.items()}

    def _params(self, layer):
        return [self.tensor[id(b)] for b in layer.blobs]

    def forward(self):
        """The loss (the net's single SoftmaxWithLoss top)."""
        values = dict(self.inputs)
        loss = None
        for layer, bottoms, tops in zip(self.net.layers, self.net.bottom_names.values(),
                                        self.net.top_names.values()):
            xs = [values[b] for b in bottoms]
            kind = layer.type
            if kind == "Input":
                continue
            if kind == "Split":
                for t in tops:
                    values[t] = xs[0]
                continue
            if kind == "SoftmaxWithLoss":
                loss = F.cross_entropy(xs[0].flatten(1), xs[1].long())   # (N, C, 1, 1) too
                values[tops[0]] = loss
                continue
            values[tops[0]] = self._layer(layer, xs)
        return loss

    def _layer(self, layer, xs):
        kind, x, p = layer.type, xs[0], self._params(layer)
        if kind == "Convolution":
            return F.conv2d(x, p[0], p[1] if layer.bias_term else None, layer.stride, layer.pad,
                            layer.dilation, layer.group)
        if kind == "Pooling":
            kernel = x.shape[2:] if layer.global_pooling else layer.kernel
            if layer.method == _POOL.MAX:
                return F.max_pool2d(x, kernel, layer.stride, layer.pad, ceil_mode=layer.ceil_mode)
            return F.avg_pool2d(x, kernel, layer.stride, layer.pad, ceil_mode=layer.ceil_mode,
                                count_include_pad=True)
        if kind == "ReLU":
            return F.leaky_relu(x, layer.negative_slope) if layer.negative_slope else F.relu(x)
        if kind == "InnerProduct":
            return F.linear(x.flatten(layer.axis), p[0], p[1] if layer.bias_term else None)
        if kind == "BatchNorm":
            mean, var = p[0], p[1]
            return F.batch_norm(x, mean, var, training=not layer.use_global_stats,
                                momentum=1 - layer.moving_average_fraction, eps=layer.eps)
        if kind == "Scale":
            y = x * p[0].view(1, -1, 1, 1)
            return y + p[1].view(1, -1, 1, 1) if layer.bias_index is not None else y
        if kind == "Eltwise":
            if layer.operation != 1 or any(c != 1 for c in layer.coeffs):
                raise NotImplementedError("Eltwise other than a plain SUM")
            return sum(xs[1:], xs[0])
        if kind == "Concat":
            return torch.cat(xs, dim=layer.axis)
        if kind == "LRN":
            if layer.axes == (1,):
                return F.local_response_norm(x, layer.size, layer.coeff * layer.size, layer.beta,
                                             layer.shift)
            half = layer.size // 2
            window = F.avg_pool2d(x * x, layer.size, 1, half, count_include_pad=True)
            return x * (1 + layer.coeff * layer.size ** 2 * window) ** -layer.beta
        if kind == "Dropout":
            return F.dropout(x, 1 - layer.keep, training=True)
        raise NotImplementedError(f"layer type {kind}")

    def forward_backward(self):
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.forward()
        loss.backward()
        return loss

    def step(self):
        loss = self.forward_backward()
        self.optimizer.step()
        return loss

    def gradients(self):
        """{owlnet learnable index: gradient array} for the learned parameters."""
        return {i: self.tensor[id(b)].grad.numpy() for i, b in enumerate(self.net.learnable_params)
                if isinstance(self.tensor[id(b)], torch.nn.Parameter)}

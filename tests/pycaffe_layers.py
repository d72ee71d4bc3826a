"""Python layers used by the pycaffe tests (found on sys.path, as users' layers are).

Each is a user's layer written against ``owlnet.Layer`` (pycaffe's ``caffe.Layer``).
"""
import json

import numpy as np

import owlnet

#: The linear map LinearData's targets come from: y = x @ TRUE_W.T + TRUE_B.
TRUE_W = np.array([[1.5, -2.0, 0.5], [0.25, 1.0, -1.0]])
TRUE_B = np.array([0.5, -0.25])


class EuclideanLoss(owlnet.Layer):
    """loss = sum((a - b)^2) / (2 N); d loss / d a = (a - b) / N, d loss / d b = -(a - b) / N,
    both times the loss's own top diff (its loss weight)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise ValueError("EuclideanLoss needs two bottoms")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise ValueError("EuclideanLoss bottoms must hold as many values")
        self.diff = np.zeros_like(bottom[0].data)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data.reshape(self.diff.shape)
        top[0].data[0] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                grad = sign * top[0].diff[0] * self.diff / bottom[i].num
                bottom[i].diff[...] = grad.reshape(bottom[i].diff.shape)


class ChannelScale(owlnet.Layer):
    """y[n, c, ...] = w[c] * x[n, c, ...] with a learnable w (one blob, initialised from
    param_str's JSON {"init": value}, default 1)."""

    def setup(self, bottom, top):
        init = json.loads(self.param_str).get("init", 1.0) if self.param_str else 1.0
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = init

    def _w(self, blob):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (blob.num_axes - 2))

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self._w(bottom[0])

    def backward(self, top, propagate_down, bottom):
        axes = tuple(a for a in range(bottom[0].num_axes) if a != 1)
        self.blobs[0].diff[...] += np.sum(top[0].diff * bottom[0].data, axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self._w(bottom[0])


class LinearData(owlnet.Layer):
    """A data layer: tops x (batch x 3, uniform in [-1, 1]) and y = x W^T + b (batch x 2);
    param_str's JSON gives batch and seed. Batch k is the same for a given seed."""

    def setup(self, bottom, top):
        settings = json.loads(self.param_str)
        self.batch, self.seed, self.count = settings["batch"], settings["seed"], 0
        top[0].reshape(self.batch, 3)
        top[1].reshape(self.batch, 2)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        x = np.random.default_rng([self.seed, self.count]).uniform(-1, 1, (self.batch, 3))
        self.count += 1
        top[0].data[...] = x
        top[1].data[...] = x @ TRUE_W.T + TRUE_B

    def backward(self, top, propagate_down, bottom):
        pass


class PhaseAndParam(owlnet.Layer):
    """Tops: the phase, and the float in param_str."""

    def reshape(self, bottom, top):
        top[0].reshape()
        top[1].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase
        top[1].data[()] = float(self.param_str)


class FailsInForward(owlnet.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        raise KeyError("the user's bug")


class NotALayer:
    """A class that does not derive from owlnet.Layer."""

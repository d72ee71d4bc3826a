"""CPU kernels, with ``kernels.gpu``'s entry points: convolution (``convolution``, whose
depthwise case is ``depthwise``, whose small windows are ``direct`` and whose float32 3x3
and 5x5 ones with stride 1 are ``winograd``), the fully connected
layers' products (``products``), pooling (``pooling``) and the per-channel passes of the
training step and LRN (``normalization``). ``shared`` cuts their work into pieces for the worker
threads; ``native`` loads the compiled loops of ``native.c`` that ``direct``, ``winograd``,
``pooling``, ``normalization`` and col2im run on. ``updates`` holds the solver's SGD step as one pass.
"""
from . import (convolution, depthwise, direct, native, normalization, pooling, products,
               shared, updates, winograd)
from .convolution import conv_backward_data, conv_backward_filter, conv_forward
from .normalization import (batch_norm_backward, batch_norm_forward, channel_sums,
                            lrn_across_channels_backward, lrn_across_channels_forward,
                            relu_backward, scale_backward, scale_forward)
from .pooling import ave_pool_backward, ave_pool_forward, max_pool_backward, max_pool_forward
from .products import add_matmul, matmul

__all__ = ["convolution", "depthwise", "direct", "native", "normalization", "pooling", "products",
           "shared", "updates", "winograd", "conv_forward", "conv_backward_data", "conv_backward_filter", "matmul",
           "add_matmul", "max_pool_forward", "max_pool_backward", "ave_pool_forward", "ave_pool_backward",
           "batch_norm_forward", "batch_norm_backward", "channel_sums", "relu_backward",
           "lrn_across_channels_forward", "lrn_across_channels_backward", "scale_forward",
           "scale_backward"]

"""``import caffe`` for pycaffe scripts: owlnet under Caffe's names.

Every public name of ``owlnet`` is here, and Caffe's submodules are owlnet's own modules
(the same objects), so ``import caffe.io``, ``from caffe.proto import caffe_pb2``,
``import caffe.draw``, ``from caffe.coord_map import crop`` and
``from caffe import layers as L, params as P, to_proto`` work unchanged.
"""
import sys

import owlnet
from owlnet import *  # noqa: F401,F403
from owlnet import __version__  # noqa: F401
from owlnet import classifier, coord_map, detector, draw, io, net_spec, proto  # noqa: F401
from owlnet.proto import caffe_pb2  # noqa: F401

for _name, _module in {"io": io, "proto": proto, "proto.caffe_pb2": caffe_pb2,
                       "net_spec": net_spec, "draw": draw, "classifier": classifier,
                       "detector": detector, "coord_map": coord_map,
                       "pycaffe": owlnet}.items():
    sys.modules[f"{__name__}.{_name}"] = _module
del _name, _module

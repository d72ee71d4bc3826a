"""Layer families, one module each; importing this package registers every layer type."""
from . import common, data, input, loss, neuron, normalization, vision  # noqa: F401
from . import hdf5  # noqa: F401
from . import python  # noqa: F401  (type "Python": user layers, pycaffe's PythonLayer)
from . import extra, recurrent, reduction, spp, ssd, window_data  # noqa: F401
from .base import Layer, create_layer, known_types, layer_class, register  # noqa: F401

"""Layer families; importing this package registers every layer type."""
from .base import Layer, create_layer, known_types, layer_class, register  # noqa: F401

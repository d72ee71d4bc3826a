"""The errors owlnet raises for problems in a user's files and data.

Every user-facing failure is an :class:`OwlnetError`; its message says what to fix
(file and line, layer, blob and shape, LMDB key), not where the stack was.
"""


class OwlnetError(Exception):
    """Base class of every error caused by a user's files, data or arguments."""


class ConfigError(OwlnetError):
    """A prototxt or solver definition that cannot be parsed or does not make sense."""


class ShapeError(OwlnetError):
    """Blob shapes that do not fit a layer, or weights whose shape does not match."""


class DataError(OwlnetError):
    """An input record, image, list file, LMDB or mean file that cannot be used."""


class SnapshotError(OwlnetError):
    """A weights or solver-state file that cannot be read or written."""


class TrainingError(OwlnetError):
    """Training that cannot go on (a NaN or Inf loss, a failed collective)."""

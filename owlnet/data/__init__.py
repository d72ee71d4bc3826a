"""Data input: Datum records, LMDB access, Caffe's transformations and background prefetch.

``datum``: Datum <-> array, image decode/encode, image list files; ``db``: LMDB reader and
writer; ``transform``: DataTransformer (crop/mirror on the host, mean/scale on the device);
``prefetch``: the bounded background queue the data layers read from.
"""

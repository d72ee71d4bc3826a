"""Protocol-buffer bindings for owlnet's Caffe-compatible schema.

``caffe_pb2`` is generated from ``proto/caffe.proto`` by
``python scripts/gen_proto.py``; do not edit it by hand.
"""

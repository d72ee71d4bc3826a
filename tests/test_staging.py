"""Data layer batches uploaded through pinned buffers on a side stream (on the fake device)."""
import numpy as np

import owlnet
from owlnet import backend

import fakecupy
from netutil import write_bar_lmdb

NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ crop_size: 6 mirror: true scale: 0.5 mean_value: 30 }}
  data_param {{ source: "{source}" batch_size: 4 backend: LMDB }} }}
"""


def batches(source, count):
    backend.set_random_seed(5)
    net = owlnet.Net(NET.format(source=source), owlnet.TRAIN)
    out = []
    for _ in range(count):
        net.forward()
        out.append((backend.to_host(net.blobs["data"].data).copy(),
                    backend.to_host(net.blobs["label"].data).copy()))
    net.close()
    return net, out


def test_pinned_side_stream_upload_matches_the_cpu(tmp_path):
    source = tmp_path / "db"
    write_bar_lmdb(source, 10, seed=1)
    _, expected = batches(source, 3)
    with fakecupy.fake_gpu() as cupy:
        log = cupy.cuda.Stream.log
        log.clear()
        net, got = batches(source, 3)
    for (want_x, want_y), (x, y) in zip(expected, got):
        assert x.dtype == np.float32 and np.array_equal(want_x, x)
        assert np.array_equal(want_y, y)
    side = net.layers[0]._pinned._stream.name
    copies = [i for i, entry in enumerate(log) if entry == ("copy", side)]
    assert len(copies) == 3, log
    for n, i in enumerate(copies, start=1):
        # the copy is recorded on the side stream and the compute stream waits for that event
        assert log[i + 1] == ("record", side, n) and log[i + 2] == ("wait", "compute", side, n)
    # the third upload reuses slot 0: it waits for slot 0's copy (host) and for the compute
    # stream to pass slot 0's consumer (side stream) before copying again
    third = log[copies[1] + 3:copies[2]]
    assert ("host waits", side, 1) in third
    assert any(e[0] == "wait" and e[1] == side and e[2] == "compute" for e in third), third

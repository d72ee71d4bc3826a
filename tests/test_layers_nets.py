"""The new layer types inside whole nets: an SSD-style deploy net, an LSTM net whose
.caffemodel keeps Caffe's blob order, and refusals that name the file and line."""
import numpy as np
import pytest

import owlnet
from owlnet import backend
from owlnet.proto import caffe_pb2

SSD_NET = """
name: "mini_ssd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU6" bottom: "conv" top: "conv" }
layer { name: "norm" type: "Normalize" bottom: "conv" top: "norm"
  norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 20 } } }
layer { name: "loc" type: "Convolution" bottom: "norm" top: "loc"
  convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loc_perm" type: "Permute" bottom: "loc" top: "loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "loc_flat" type: "Flatten" bottom: "loc_perm" top: "loc_flat" }
layer { name: "conf" type: "Convolution" bottom: "norm" top: "conf"
  convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "conf_perm" type: "Permute" bottom: "conf" top: "conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conf_flat" type: "Flatten" bottom: "conf_perm" top: "conf_flat" }
layer { name: "conf_reshape" type: "Reshape" bottom: "conf_flat" top: "conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "conf_softmax" type: "Softmax" bottom: "conf_reshape" top: "conf_softmax" softmax_param { axis: 2 } }
layer { name: "conf_out" type: "Flatten" bottom: "conf_softmax" top: "conf_out" }
layer { name: "priors" type: "PriorBox" bottom: "conv" bottom: "data" top: "priors"
  prior_box_param { min_size: 3 aspect_ratio: 2 flip: false clip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "detection_out" type: "DetectionOutput" bottom: "loc_flat" bottom: "conf_out" bottom: "priors" top: "detection_out"
  include { phase: TEST }
  detection_output_param { num_classes: 3 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 10 } code_type: CENTER_SIZE keep_top_k: 5 confidence_threshold: 0.01
    save_output_param { output_directory: "unused" } } }
"""


def test_ssd_style_deploy_net(tmp_path):
    backend.set_random_seed(3)
    net = owlnet.Net(SSD_NET, owlnet.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(0).random((1, 3, 8, 8))
    out = net.forward()["detection_out"]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and 1 <= out.shape[2] <= 5
    assert set(out[0, 0, :, 1]) <= {1.0, 2.0}
    scores = out[0, 0, :, 2]
    assert np.all((scores > 0.01) & (scores <= 1))
    assert net.blobs["priors"].data.shape == (1, 2, 4 * 4 * 2 * 4)
    assert net.params["norm"][0].data.shape == (4,)
    path = tmp_path / "ssd.caffemodel"
    net.save(str(path))
    again = owlnet.Net(SSD_NET, str(path), owlnet.TEST)
    again.blobs["data"].data[...] = net.blobs["data"].data
    np.testing.assert_array_equal(again.forward()["detection_out"], out)


LSTM_NET = """
layer { name: "x" type: "Input" top: "x" top: "cont" input_param { shape { dim: 3 dim: 2 dim: 5 } shape { dim: 3 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
  recurrent_param { num_output: 4 weight_filler { type: "uniform" min: -0.1 max: 0.1 } } }
"""


def test_lstm_caffemodel_blob_order(tmp_path):
    net = owlnet.Net(LSTM_NET, owlnet.TRAIN)
    path = tmp_path / "lstm.caffemodel"
    net.save(str(path))
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(path.read_bytes())
    (layer,) = [lp for lp in saved.layer if lp.name == "lstm"]
    # Caffe's order: W_xc (4H, I), b_c (4H), W_hc (4H, H)
    assert [tuple(b.shape.dim) for b in layer.blobs] == [(16, 5), (16,), (16, 4)]


def test_refusals_name_file_and_line(tmp_path):
    text = ('layer { name: "d" type: "Input" top: "a" top: "m"\n'
            '  input_param { shape { dim: 1 dim: 1 dim: 2 dim: 2 } shape { dim: 1 dim: 1 dim: 2 dim: 2 } } }\n'
            'layer { name: "up" type: "Upsample" bottom: "a" bottom: "m" top: "u"\n'
            '  upsample_param { scale: 2 } }\n')
    path = tmp_path / "segnet.prototxt"
    path.write_text(text)
    with pytest.raises(owlnet.ConfigError, match=r"segnet\.prototxt:3.*'up'.*SegNet"):
        owlnet.Net(str(path), owlnet.TEST)

"""Caffe's compute_image_mean tool: see owlnet/tools/mean.py."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from owlnet.tools.mean import main  # noqa: E402
sys.exit(main())

"""Caffe's convert_imageset tool: see owlnet/tools/convert.py."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from owlnet.tools.convert import main  # noqa: E402
sys.exit(main())

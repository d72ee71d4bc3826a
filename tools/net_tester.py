#!/usr/bin/env python3
"""Score a solver's test net: net_tester.py SOLVER [--snapshot N | --weights W] [--multiview] [--iters K] [--gpu IDX],
or a net as `caffe test`: net_tester.py -model M -weights W [-iterations N] (see owlnet/tools/test.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owlnet.tools.test import main  # noqa: E402

sys.exit(main())

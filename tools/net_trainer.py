#!/usr/bin/env python3
"""Train a Caffe solver: net_trainer.py SOLVER [--snapshot N] [-n N] [--weights W] [--device cpu|gpu]."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owlnet.tools.train import main  # noqa: E402

sys.exit(main())

#!/usr/bin/env python3
"""Train a Caffe solver: net_trainer.py SOLVER [--snapshot N] [-n N] [--weights W] [--gpu IDS|--device cpu|gpu],
or with `caffe train`'s flags: net_trainer.py --solver=S [--snapshot=X.solverstate] [--gpu 0,1|all] (see owlnet/tools/train.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owlnet.tools.train import main  # noqa: E402

sys.exit(main())

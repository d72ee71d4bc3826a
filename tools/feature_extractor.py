#!/usr/bin/env python3
"""Extract blobs' features: feature_extractor.py SOLVER BLOB[,BLOB...] OUT [--format npy|txt|lmdb] [--weights W]."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from owlnet.tools.extract import main  # noqa: E402

sys.exit(main())

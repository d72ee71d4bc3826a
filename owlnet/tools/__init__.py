"""Command-line tools with Caffe's names and flags; each module has ``main(argv=None)``.

Every tool parses with :class:`owlnet.tools.flags.FlagParser` (gflags' spellings) and picks its
device with :mod:`owlnet.tools.device`.
"""
from __future__ import annotations

import os
import sys

from ..errors import OwlnetError

#: Set to 1 by --no-python-layers; the Python layer refuses to load while it is set.
NO_PYTHON_LAYERS = "OWLNET_NO_PYTHON_LAYERS"


def add_python_layers_flag(parser) -> None:
    """``--no-python-layers``: refuse nets with Python layers (see ``apply_common_flags``)."""
    parser.add_argument("--no-python-layers", action="store_true",
                        help=f"refuse nets with Python layers, so a net file cannot run Python "
                             f"code (sets {NO_PYTHON_LAYERS}=1 for this process)")


def apply_common_flags(args) -> None:
    """What the flags every tool shares do to the process."""
    if getattr(args, "no_python_layers", False):
        os.environ[NO_PYTHON_LAYERS] = "1"


def run_command(prog: str, parser, action, argv) -> int:
    """Parse ``argv`` and call ``action(args)``; an OwlnetError becomes one line and exit 1."""
    args = parser.parse_args(argv)
    try:
        apply_common_flags(args)
        action(args)
    except OwlnetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0

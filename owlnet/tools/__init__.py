"""Command-line tools with Caffe's names and flags; each module has ``main(argv=None)``."""
from __future__ import annotations

import sys

from ..errors import OwlnetError


def run_command(prog: str, parser, action, argv) -> int:
    """Parse ``argv`` and call ``action(args)``; an OwlnetError becomes one line and exit 1."""
    args = parser.parse_args(argv)
    try:
        action(args)
    except OwlnetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0

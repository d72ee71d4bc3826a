"""Command-line tools with Caffe's names and flags; each module has ``main(argv=None)``."""

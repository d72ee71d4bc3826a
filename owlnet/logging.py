"""Log lines in Caffe's words with a glog prefix, through Python's ``logging`` ("owlnet" logger).

A line looks like glog's::

    I1123 12:00:00.123456 12345 solver.py:218] Iteration 100, lr = 0.01

(severity letter, month and day, wall time with microseconds, thread id padded to 5, source
file and line), so tools written for Caffe logs (``parse_log.py``, ``plot_training_log.py``)
read owlnet's logs. Numbers are printed as C++ streams print them by default (``%g``, six
significant digits). Nothing is printed until :func:`configure` (or the solver, through
:func:`ensure_configured`) attaches a handler: stderr by default, as glog.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

LOGGER_NAME = "owlnet"
logger = logging.getLogger(LOGGER_NAME)

_SEVERITY = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W",
             logging.ERROR: "E", logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu TTTTT file:line] message``, as glog writes it."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        severity = _SEVERITY.get(record.levelno, "I")
        prefix = (f"{severity}{stamp.tm_mon:02d}{stamp.tm_mday:02d} "
                  f"{stamp.tm_hour:02d}:{stamp.tm_min:02d}:{stamp.tm_sec:02d}.{micros:06d} "
                  f"{record.thread_native:5d} {record.filename}:{record.lineno}] ")
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _NativeThreadId(logging.Filter):
    """Adds the OS thread id (what glog prints) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.thread_native = threading.get_native_id()
        return True


def configure(stream=None, level=logging.INFO, log_file=None) -> logging.Handler:
    """Send owlnet's log to ``stream`` (stderr by default) or to ``log_file``, glog-formatted.

    Replaces handlers an earlier call installed; returns the new handler.
    """
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if log_file is not None:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(GlogFormatter())
    handler.addFilter(_NativeThreadId())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def ensure_configured() -> None:
    """Install the default stderr handler unless one was configured already."""
    if not logger.handlers:
        configure()


def num(value) -> str:
    """A number as a default-formatted C++ stream writes it (``%g``)."""
    return f"{float(value):g}"


def info(message: str) -> None:
    """Log ``message`` at INFO, naming the caller's file and line in the prefix."""
    logger.info(message, stacklevel=2)


def warning(message: str) -> None:
    logger.warning(message, stacklevel=2)


# -- Caffe's solver lines -----------------------------------------------------------------------
# Each returns the text, so the solver logs it from its own line (the prefix names the caller).

def iteration_line(iteration, per_second, seconds, display, smoothed_loss) -> str:
    return (f"Iteration {iteration} ({num(per_second)} iter/s, {num(seconds)}s/{display} iters), "
            f"loss = {num(smoothed_loss)}")


def output_line(kind: str, index: int, name: str, value, loss_weight) -> str:
    """``    Train net output #0: loss = 0.1 (* 1 = 0.1 loss)`` (kind "Train" or "Test")."""
    text = f"    {kind} net output #{index}: {name} = {num(value)}"
    if loss_weight:
        text += f" (* {num(loss_weight)} = {num(loss_weight * value)} loss)"
    return text


def lr_line(iteration, rate) -> str:
    return f"Iteration {iteration}, lr = {num(rate)}"


def testing_line(iteration, test_net_id) -> str:
    return f"Iteration {iteration}, Testing net (#{test_net_id})"

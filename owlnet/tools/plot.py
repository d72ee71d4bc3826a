"""`owlnet parse-log LOG [OUTDIR]` and `owlnet plot LOG [--out curves.png]`: a training log's numbers.

parse-log writes ``LOG.train`` and ``LOG.test`` in OUTDIR (default: beside the log), CSV files
as Caffe's tools/extra/parse_log.py writes them: one row per displayed iteration (train) or
per test pass (test), columns ``NumIters, Seconds, LearningRate`` and then each net output by
name (``loss``, ``accuracy``, ...). As in Caffe's script, ``NumIters`` is written as a float
(``100.0``), a row's Seconds is the time of its first output line, counted from the "Solving"
line (or the log's first line), and a table without rows writes no file. Unlike Caffe's script, a row's LearningRate is the rate logged for that very iteration
(Caffe's takes the one logged before the row's outputs, i.e. ``display`` iterations earlier);
with several test nets the test file gains a ``TestNet`` column.

plot draws training outputs, learning rate and test accuracy against the iteration into one
image (needs matplotlib: ``pip install 'owlnet[plot]'``).
"""
from __future__ import annotations

import bisect
import csv
import datetime
import math
import os
import re
import sys

from ..errors import ConfigError, DataError
from . import run_command
from .flags import FlagParser

# glog prefix: severity, mmdd, hh:mm:ss.micros
_STAMP = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ")
_ITERATION = re.compile(r"Iteration (\d+)")
_LEARNING_RATE = re.compile(r"Iteration (\d+), lr = (\S+)")
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = (\S+)")
_FIXED = ("NumIters", "Seconds", "LearningRate")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:      # glog's "-nan" and the like
        return math.nan


class _Clock:
    """Seconds since the first stamp it is given; glog stamps carry no year, so a stamp
    earlier than the one before it is taken to be in the next year."""

    def __init__(self):
        self.year = 2000            # a leap year, so 02-29 parses
        self.start = self.last = None

    def seconds(self, match) -> float:
        month, day, hour, minute, second, micros = (int(g) for g in match.groups())
        when = datetime.datetime(self.year, month, day, hour, minute, second, micros)
        if self.last is not None and when < self.last - datetime.timedelta(days=1):
            self.year += 1
            when = when.replace(year=self.year)
        self.last = when
        if self.start is None:
            self.start = when
        return (when - self.start).total_seconds()

    def restart_at(self, match) -> None:
        self.start = self.last = None
        self.seconds(match)


def parse_log(path) -> tuple[list[dict], list[dict]]:
    """The train rows and test rows of a Caffe/owlnet log (see the module docstring)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the log: {exc.strerror or exc}") from None
    clock = _Clock()
    rates = {}                  # iteration -> learning rate logged for it
    train, test = {}, {}        # iteration (and test net) -> row
    iteration, test_net = None, 0
    for line in lines:
        stamp = _STAMP.match(line)
        if stamp:
            if "Solving " in line:
                clock.restart_at(stamp)
            seconds = clock.seconds(stamp)
        else:
            seconds = None
        m = _TESTING.search(line)
        if m:
            test_net = int(m.group(2))
        m = _LEARNING_RATE.search(line)
        if m:
            rates[int(m.group(1))] = _number(m.group(2))
        m = _ITERATION.search(line)
        if m:
            iteration = int(m.group(1))
        m = _OUTPUT.search(line)
        if m and iteration is not None:
            kind, index, name, value = m.groups()
            key = iteration if kind == "Train" else (iteration, test_net)
            rows = train if kind == "Train" else test
            row = rows.setdefault(key, {"NumIters": float(iteration)})
            if test_net and kind == "Test":
                row["TestNet"] = test_net
            if name in row:         # several values of one output blob
                name = f"{name}#{index}"
            row[name] = _number(value)
            if seconds is not None:
                row.setdefault("Seconds", seconds)
    return _with_rates(list(train.values()), rates), _with_rates(list(test.values()), rates)


def _with_rates(rows: list[dict], rates: dict) -> list[dict]:
    """Give each row the rate of its iteration, else the latest one before, else the first."""
    iterations = sorted(rates)
    for row in rows:
        at = bisect.bisect_right(iterations, row["NumIters"])
        row["LearningRate"] = (rates[iterations[max(at - 1, 0)]] if iterations else math.nan)
    return rows


def columns(rows: list[dict]) -> list[str]:
    """NumIters, Seconds, LearningRate, then the other keys in the order they first appear."""
    names = list(_FIXED)
    for row in rows:
        names.extend(k for k in row if k not in names)
    return names


def write_csv(path, rows: list[dict]) -> bool:
    """``rows`` as CSV under the header ``columns(rows)`` (a missing value is an empty field);
    no rows write no file, as Caffe's parse_log. Whether a file was written."""
    if not rows:
        return False
    names = columns(rows)
    try:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            for row in rows:
                writer.writerow("" if row.get(n) is None else repr(row[n]) for n in names)
    except OSError as exc:
        raise DataError(f"{path}: cannot write the CSV file: {exc.strerror or exc}") from None
    return True


def parse_main(argv) -> int:
    p = FlagParser(prog="owlnet parse-log",
                   description="write a training log's numbers as CSV (LOG.train, LOG.test), "
                               "like Caffe's parse_log.py")
    p.add_argument("log", help="training log (owlnet's or Caffe's)")
    p.add_argument("outdir", nargs="?", help="folder for the CSV files (default: the log's)")
    return run_command("parse-log", p, _write_csvs, argv)


def _write_csvs(args) -> None:
    train, test = parse_log(args.log)
    outdir = args.outdir or os.path.dirname(os.path.abspath(args.log))
    if not os.path.isdir(outdir):
        raise ConfigError(f"{outdir}: no such folder for the CSV files")
    base = os.path.join(outdir, os.path.basename(args.log))
    for path, rows in ((base + ".train", train), (base + ".test", test)):
        if write_csv(path, rows):
            print(f"{path}: {len(rows)} rows")
        else:
            print(f"Not writing {path}; no lines to write")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("owlnet plot needs matplotlib, which is not installed "
                          "(pip install 'owlnet[plot]' or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows, name):
    points = [(row["NumIters"], row[name]) for row in rows if name in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot(train: list[dict], test: list[dict], out, title: str = "") -> None:
    """Three panels against the iteration: train outputs, learning rate, test accuracies."""
    plt = _pyplot()
    fig, (loss_ax, lr_ax, test_ax) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    outputs = [n for n in columns(train) if n not in _FIXED]
    for name in outputs:
        loss_ax.plot(*_series(train, name), label=name)
    loss_ax.set_ylabel("training output")
    lr_ax.plot(*_series(train, "LearningRate"), drawstyle="steps-post")
    lr_ax.set_ylabel("learning rate")
    test_names = [n for n in columns(test) if n not in _FIXED and n != "TestNet"]
    accuracies = [n for n in test_names if "acc" in n or "top-" in n] or test_names
    for name in accuracies:
        test_ax.plot(*_series(test, name), marker="o", label=name)
    test_ax.set_ylabel("test accuracy" if accuracies is not test_names else "test output")
    test_ax.set_xlabel("iteration")
    for ax in (loss_ax, test_ax):
        if ax.get_lines():
            ax.legend(loc="best", fontsize="small")
    for ax in (loss_ax, lr_ax, test_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write the plot: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def plot_main(argv) -> int:
    p = FlagParser(prog="owlnet plot",
                   description="plot training outputs, learning rate and test accuracy of a "
                               "training log against iteration")
    p.add_argument("log", help="training log (owlnet's or Caffe's)")
    p.add_argument("--out", help="image file to write (default: LOG.png; the suffix picks "
                                 "the format)")
    return run_command("plot", p, _plot_log, argv)


def _plot_log(args) -> None:
    out = args.out or args.log + ".png"
    train, test = parse_log(args.log)
    if not train and not test:
        raise DataError(f"{args.log}: no 'Train net output' or 'Test net output' lines to plot")
    plot(train, test, out, title=os.path.basename(args.log))
    print(f"wrote {out}")


def main(argv=None) -> int:
    """``main(["parse-log", LOG, ...])`` parses; ``main(["plot", LOG, ...])`` or
    ``main([LOG, ...])`` plots."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "parse-log":
        return parse_main(argv[1:])
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    return plot_main(argv)


if __name__ == "__main__":
    sys.exit(main())

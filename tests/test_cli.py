"""`owlnet SUBCOMMAND`: dispatch to the tools, usage and unknown subcommands."""
import subprocess
import sys

from owlnet import cli
from owlnet import logging as owl_logging


def test_usage_lists_every_subcommand(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out
    assert cli.main(["--help"]) == 0


def test_unknown_subcommand(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown subcommand 'trian'" in capsys.readouterr().err


def test_parse_log_goes_to_the_csv_writer(tmp_path, capsys):
    log = tmp_path / "train.log"
    owl_logging.configure(log_file=str(log))
    owl_logging.info(owl_logging.iteration_line(0, 0.0, 0.0, 1, 2.5))
    owl_logging.info(owl_logging.output_line("Train", 0, "loss", 2.5, 1))
    owl_logging.info(owl_logging.lr_line(0, 0.01))
    owl_logging.configure(stream=sys.stderr)
    assert cli.main(["parse-log", str(log)]) == 0
    train_csv = (tmp_path / "train.log.train").read_text().splitlines()
    assert train_csv[0].startswith("NumIters") and "2.5" in train_csv[1]


def test_every_subcommand_answers_help():
    for name in cli.COMMANDS:
        done = subprocess.run([sys.executable, "-m", "owlnet.cli", name, "--help"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, done.stderr)
        assert "usage:" in done.stdout

"""The command-line parser every tool uses: argparse, read with gflags' spellings.

Caffe's tools parse their flags with gflags, and the scripts people have are written for it.
:class:`FlagParser` accepts, for every option a tool declares:

* ``--name value``, ``--name=value``, ``-name value``, ``-name=value`` (one dash or two);
* ``-`` and ``_`` alike in names (``--resize_height`` is ``--resize-height``);
* booleans as gflags reads them: ``--flag`` and ``--flag=true`` turn one on, ``--noflag`` and
  ``--flag=false`` turn it off (also 1/0, yes/no, t/f, y/n); a boolean never takes the next
  argument, so ``--shuffle ROOT/ LIST DB`` keeps ROOT/ as a positional argument;
* short options as argparse declares them (``-n 4``).

A flag the tool does not declare is an error naming it (with the closest names it has).
Booleans are the options declared with ``action="store_true"`` or ``"store_false"``.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys

_NUMBER = re.compile(r"-\.?\d")
_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")

SPELLINGS = ("flags: --name value, --name=value or -name value; '-' and '_' alike in names; "
             "booleans: --flag, --flag=true|false, --noflag (never the next argument)")


def parse_bool(text: str) -> bool:
    """gflags' boolean values: true/false, t/f, 1/0, yes/no, y/n (any case)."""
    value = text.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _is_boolean(action) -> bool:
    return action.nargs == 0 and isinstance(action.const, bool)


class FlagParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` that reads gflags' spellings (see the module)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", SPELLINGS)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        tokens = list(sys.argv[1:] if args is None else args)
        rewritten, booleans = self._rewrite(tokens)
        namespace, extras = super().parse_known_args(rewritten, namespace)
        for dest, value in booleans.items():
            setattr(namespace, dest, value)
        return namespace, extras

    def _options(self) -> dict:
        """Normalised name -> (action, the spelling argparse is given)."""
        table = {}
        for action in self._actions:
            if not action.option_strings:
                continue
            longs = [s for s in action.option_strings if s.startswith("--")]
            spelling = (longs or action.option_strings)[0]
            for text in action.option_strings:
                table.setdefault(_key(text), (action, spelling))
        return table

    def _rewrite(self, tokens):
        """argparse's spellings of ``tokens``, and the booleans' values (dest -> value, the
        last spelling winning), which are set after argparse has parsed the rest."""
        table = self._options()
        out, booleans = [], {}
        index = 0
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if token == "--":
                out.extend(tokens[index - 1:])
                break
            if not token.startswith("-") or token == "-" or _NUMBER.match(token):
                out.append(token)
                continue
            name, has_value, value = token.partition("=")
            key, negated = _key(name), False
            if key not in table:
                plain = key[2:].lstrip("_") if key.startswith("no") else ""
                if plain in table and _is_boolean(table[plain][0]):
                    key, negated = plain, True
                elif not token.startswith("--") and token[:2] in self._option_string_actions:
                    out.append(token)        # argparse's attached short value: -n4
                    continue
                else:
                    self._unknown(name, table)
            action, spelling = table[key]
            if _is_boolean(action):
                if negated and has_value:
                    self.error(f"{name} takes no value (write --{key}=true|false)")
                try:
                    on = parse_bool(value) if has_value else not negated
                except ValueError as exc:
                    self.error(f"flag {name}: {exc}")
                booleans[action.dest] = action.const if on else not action.const
                continue
            if has_value:
                out.append(f"{spelling}={value}")
                continue
            if action.nargs is None and index < len(tokens):
                out.append(f"{spelling}={tokens[index]}")   # its value, even one like '-1'
                index += 1
            else:
                out.append(spelling)
        return out, booleans

    def _unknown(self, name: str, table: dict) -> None:
        close = difflib.get_close_matches(_key(name), list(table), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        self.error(f"unknown flag '{name}'{hint}")

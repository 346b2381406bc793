"""Command-line helpers shared by ``adalomo experiment`` and ``adalomo memory``."""

from __future__ import annotations

import argparse
import sys


class DeprecatedAlias(argparse.Action):
    """A former spelling of a flag: sets the new flag's ``dest`` to ``const`` and says on stderr which name to
    use instead. Hidden from ``--help``; kept for one release after a rename."""

    def __init__(self, option_strings, dest, new: str, const=True, **kwargs):
        kwargs.update(nargs=0, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, const=const, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
              f"use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const)

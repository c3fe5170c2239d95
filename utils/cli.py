"""The command line every numbered script shares: `--conf PATH`, `--set dotted.key=value ...`."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from utils.config import load_config
from utils.errors import UserError


def make_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf", default="conf.yaml", help="config file (default: conf.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override config keys, values parsed as YAML")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse arguments and load the config: returns (args, cfg)."""
    args = parser.parse_args(argv)
    return args, load_config(args.conf, args.overrides)


def run(main: Callable[[], object]) -> None:
    """Run a script's main(): a UserError is one line on stderr and exit 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)

"""What every attnseg command shares: config arguments and the one-message error exit."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from attnseg.errors import AttnsegError

__all__ = ["add_config_args", "run_main", "user_message"]


def add_config_args(parser: argparse.ArgumentParser, *, positional: bool = True, required: bool = True,
                    help: str = "experiment config (YAML)") -> None:
    """``config`` (positional) or ``--config`` (``required`` or not), and the repeatable ``--set KEY=VALUE``."""
    if positional:
        parser.add_argument("config", help=help)
    else:
        parser.add_argument("--config", required=required, default=None, help=help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.head.feature_size=24 (value parsed as YAML; repeatable)",
    )


def user_message(error: AttnsegError) -> str:
    """The message of ``error``; for one re-raised from a data-loader worker (PyTorch puts the worker's whole
    traceback in it), the original message and the worker, e.g. ``cannot read image a.png ... (data-loader worker
    1)``."""
    text = str(error)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    where = text.split("\n", 1)[0].removeprefix(f"Caught {type(error).__name__} in ").rstrip(".")
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    original = text[text.rindex(marker) + len(marker):].strip() if marker in text else text.splitlines()[-1]
    return f"{original} ({where.replace('DataLoader worker process', 'data-loader worker')})"


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a user error prints ``error: <message>`` (no traceback) and exits with status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except AttnsegError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""Command line: ``python -m maesil {fit,validate,test,predict} --config ...`` and ``python -m maesil <tool>``.

The first argument picks what runs: a tool of :data:`maesil.tools.TOOLS` (``phantoms``, ``check-data``,
``prepare``, ``benchmark-recon``, ``export-encoder``, ``compare-init``, ``sweep-local``; each has ``--help``)
gets the remaining arguments; anything else goes to :class:`maesil.lightning_cli.MaesilCLI`, the
LightningCLI subcommands (which also report an unknown name).
"""

from __future__ import annotations

import logging
import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence

from jsonargparse import DefaultHelpFormatter

from maesil.tools import TOOLS


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (not the stream of the first call), so
    redirected or captured stderr keeps working."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Shows maesil's own messages (data found, files excluded, the train/val split) on stderr.

    Library use stays silent unless the application configures logging; the command line is an
    application, and nothing it skips or decides about the data should go unseen.
    """
    logger = logging.getLogger("maesil")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[maesil] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)


class _ToolListFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help that keeps the line breaks of the description: one tool per line."""


def tool_list() -> str:
    """The tools with their one-line descriptions, one per line, for ``python -m maesil --help``."""
    width = max(len(name) for name in TOOLS)
    lines = [f"  {name:<{width}}  {tool.description}" for name, tool in TOOLS.items()]
    return "Tools besides the Lightning subcommands (each has --help):\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m maesil`` and the ``maesil`` console script."""
    configure_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        raise SystemExit(TOOLS[args[0]](args[1:]))
    from maesil.lightning_cli import MaesilCLI  # imports Lightning and every method: only for training runs

    description = "maesil: self-supervised pretraining of 3D medical images.\n\n" + tool_list()
    MaesilCLI(args=None if argv is None else args,
              parser_kwargs={"description": description, "formatter_class": _ToolListFormatter})

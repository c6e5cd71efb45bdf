"""Command-line tools that are not training runs: ``python -m maesil <tool> --help``."""

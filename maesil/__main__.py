"""``python -m maesil``: see :mod:`maesil.cli`."""

from maesil.cli import main

if __name__ == "__main__":
    main()

"""``python -m surge``: the same as the ``surge`` command."""

from surge.cli import main

# The guard matters: process pools start by importing __main__ again.
if __name__ == "__main__":
    main()

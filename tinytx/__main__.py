"""``python -m tinytx``: the same as the ``tinytx`` command."""

from tinytx.cli import main

if __name__ == "__main__":
    main()

"""``python -m fencelock``: the same command line as the installed ``fencelock``."""

from fencelock._entry import main

if __name__ == "__main__":
    main(prog_name="fencelock")

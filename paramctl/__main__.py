"""``python -m paramctl``."""

from paramctl.cli import main

if __name__ == "__main__":
    main()

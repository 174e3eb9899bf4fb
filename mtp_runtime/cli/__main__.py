"""`python -m mtp_runtime.cli`: the same as the `mtp-runtime` console script."""

from . import main

if __name__ == "__main__":
    main()

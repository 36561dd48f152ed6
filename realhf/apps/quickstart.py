"""``python -m realhf.apps.quickstart <experiment> key=value ...`` (see realhf.api.quickstart.entrypoint)."""

import sys

from realhf.api.quickstart.entrypoint import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

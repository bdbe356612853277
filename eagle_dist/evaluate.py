"""`python -m eagle_dist.evaluate`: the same as `eagle-dist evaluate` (see eagle_dist.cli.evaluate)."""

import sys

from eagle_dist.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m eagle_dist.sweep`: the same as `eagle-dist sweep` (see eagle_dist.cli.sweep)."""

import sys

from eagle_dist.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())

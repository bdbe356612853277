"""`python -m eagle_dist.visualize`: the same as `eagle-dist visualize` (see eagle_dist.cli.visualize)."""

import sys

from eagle_dist.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m eagle_dist.bench`: the same as `eagle-dist bench` (see eagle_dist.cli.bench)."""

import sys

from eagle_dist.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())

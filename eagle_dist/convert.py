"""`python -m eagle_dist.convert`: the same as `eagle-dist convert` (see eagle_dist.cli.convert)."""

import sys

from eagle_dist.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m eagle_dist.predict`: the same as `eagle-dist predict` (see eagle_dist.cli.predict)."""

import sys

from eagle_dist.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())

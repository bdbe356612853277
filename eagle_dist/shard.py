"""`python -m eagle_dist.shard`: the same as `eagle-dist shard` (see eagle_dist.cli.shard)."""

import sys

from eagle_dist.cli.shard import main

if __name__ == "__main__":
    sys.exit(main())

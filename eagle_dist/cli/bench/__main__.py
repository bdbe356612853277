"""`python -m eagle_dist.cli.bench`: the same as `python -m eagle_dist.bench`."""

import sys

from eagle_dist.cli.bench import main

sys.exit(main())

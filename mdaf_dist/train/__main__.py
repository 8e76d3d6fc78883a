"""`python -m mdaf_dist.train --config FILE [overrides]`: the torchrun / TorchX entry point."""

import sys

from mdaf_dist.train.main import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m mdaf_dist.train --config FILE [overrides]`: the torchrun / TorchX entry point, the
same command as `mdaf train`."""

import sys

from mdaf_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""A nanogpt-cpu training step, tinytx against PyTorch eager: see :mod:`tinytx.bench.train`.

python benchmarks/train.py [--backend numpy] [--threads 2] [--repeats 7] [--json out.json]
"""

import sys

from tinytx.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

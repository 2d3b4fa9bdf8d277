"""Encoder block and attention, tinytx against PyTorch: see :mod:`tinytx.bench.encoder`.

python benchmarks/encoder.py [--backend numpy] [--threads N] [--repeats 7] [--json out.json]
"""

import sys

from tinytx.bench.encoder import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Every attention variant, time and peak memory: see :mod:`tinytx.bench.attention`.

python benchmarks/attention.py [--backend numpy] [--seq 1024 ...] [--variant blockwise ...]
                               [--repeats 3] [--json attention.json]
"""

import sys

from tinytx.bench.attention import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Forward + backward against PyTorch, and attention's backward memory: see
:mod:`tinytx.bench.backward`.

python benchmarks/backward.py [--backend numpy] [--threads 2] [--repeats 7] [--seq 4096]
                              [--case encoder|gpt|attention ...] [--json backward.json]
"""

import sys

from tinytx.bench.backward import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""GPT generation with and without the KV cache, against transformers: see
:mod:`tinytx.bench.generate`.

python benchmarks/generate.py [--backend numpy] [--threads 2] [--contexts 64 ...] [--json out.json]
"""

import sys

from tinytx.bench.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

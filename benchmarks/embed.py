"""Sentence embeddings, tinytx against sentence-transformers: see :mod:`tinytx.bench.embed`.

python benchmarks/embed.py [--backend numpy] [--threads N] [--repeats 5] [--json out.json]
"""

import sys

from tinytx.bench.embed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""tinytx and PyTorch trained side by side: the nanogpt-cpu preset from the same initial
weights on the same batches; see :func:`tinytx.bench.train.lockstep`.

python benchmarks/train_vs_torch.py [--steps 2000] [--threads N] [--out train_vs_torch]

Prints both validation losses at every evaluation, writes OUT/result.json, and exits 0
when tinytx's final validation loss is within 0.03 of torch's.
"""

import sys

from tinytx.bench.train import lockstep_main

if __name__ == "__main__":
    sys.exit(lockstep_main(sys.argv[1:]))

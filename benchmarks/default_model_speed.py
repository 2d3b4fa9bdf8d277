"""Tokens per second of the shipped model's generation, with and without the KV cache.

    python benchmarks/default_model_speed.py [--threads 1] [--new-tokens 120] [--repeats 5]

Greedy generation of ``--new-tokens`` characters after "ROMEO:" (batch 1, float32,
NumPy), best of ``--repeats`` runs per mode (tinytx.shipped.generation_speed), after a
line describing the machine (processor, BLAS, threads, load average).
"""

from __future__ import annotations

import argparse
import json

from tinytx.bench.common import describe_machine, machine_info
from tinytx.shipped import generation_speed
from tinytx.train import _set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _set_threads(args.threads)
    speed = generation_speed(new_tokens=args.new_tokens, repeats=args.repeats)
    print(describe_machine(machine_info()))
    print(json.dumps({**speed, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()

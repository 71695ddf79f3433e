"""`python -m bench [COMMAND] [arguments]`: which benchmark to run, chosen before anything heavy is imported (so
that `startup` can time `import torch` itself).

- no command: the whole benchmark (bench/suite.py): matmul peak, interleaved pairs against the Keras example,
  scaling against a ViT, the input pipeline;
- `gpu`: the GPU epoch check (bench/gpu.py);
- `digits`: whole `train.py` processes on a real image folder against the Keras example (bench/digits.py);
- `tta`: time to accuracy on Fashion-MNIST, whole processes against the Keras example (bench/tta.py);
- `startup [train.py overrides]`: what a run spends before its first step (bench/startup.py);
- `augment`: images/s of the augmentation pipelines (bench/pipeline.py);
- `step VARIANT VARIANT ...`: training-step img/s of train.py override sets, interleaved (bench/step.py).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "gpu": "bench.gpu",
    "digits": "bench.digits",
    "tta": "bench.tta",
    "startup": "bench.startup",
    "augment": "bench.pipeline",
    "step": "bench.step",
}


def main() -> None:
    command = sys.argv[1] if sys.argv[1:2] and sys.argv[1] in COMMANDS else None
    module = importlib.import_module(COMMANDS[command] if command else "bench.suite")
    module.main(sys.argv[2:] if command else sys.argv[1:])


if __name__ == "__main__":
    main()

"""Fine-tune with minitune: `accelerate launch train.py --config configs/smollm2-quotes.yaml [key=value ...]`."""

import sys

from minitune.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train())

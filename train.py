"""Fine-tune with minitune: `accelerate launch train.py --config smollm2-quotes [key=value ...]` (see --list-configs)."""

import sys

from minitune.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train())

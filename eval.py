"""Evaluate a fine-tuned checkpoint against its base: `python eval.py -p runs/smollm2-quotes/final [options]`."""

import sys

from minitune.cli import main_eval

if __name__ == "__main__":
    sys.exit(main_eval())

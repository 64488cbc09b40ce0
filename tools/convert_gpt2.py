"""Convert GPT-2 weights to our format, e.g. ``python tools/convert_gpt2.py models/gpt2 --out models/gpt2-native``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

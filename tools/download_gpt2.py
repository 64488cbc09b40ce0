"""Download pretrained GPT-2 weights, e.g. ``python tools/download_gpt2.py 124M --source hf --dir models/gpt2``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))

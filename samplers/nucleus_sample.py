"""Caption images with nucleus sampling (top-p 0.9 unless --top-p is given), e.g.
``python samplers/nucleus_sample.py --checkpoint runs/coco photos/ --seed 1 --out captions.csv``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    # A later --top-p on the command line overrides this default.
    sys.exit(main(["caption", "--top-p", "0.9", *sys.argv[1:]]))

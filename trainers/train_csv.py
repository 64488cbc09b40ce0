"""Train a captioner from a CSV or COCO captions file: ``python trainers/train_csv.py --config X.yaml --csv F --images D --out RUN``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

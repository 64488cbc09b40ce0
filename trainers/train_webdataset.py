"""Train a captioner from webdataset shards: ``python trainers/train_webdataset.py --config X.yaml --shards 'a-{0..9}.tar' --loader dali --out RUN``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

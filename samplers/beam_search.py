"""Caption images with beam search (3 beams unless --beams is given), e.g.
``python samplers/beam_search.py --checkpoint runs/coco photos/ --out captions.jsonl``."""

import sys

from gpt2_effnet.cli import main

if __name__ == "__main__":
    # A later --beams on the command line overrides this default.
    sys.exit(main(["caption", "--beams", "3", *sys.argv[1:]]))

"""``gpt2-effnet evaluate``: COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) for a captioner.

The scorers are pycocoevalcap's own pure-Python ones, so figures are comparable with
papers. What differs by default is tokenisation: the official pipeline runs Stanford's
PTB tokenizer in Java; here captions are tokenised by :func:`simple_tokenize` (lower
case, PTB-style split of clitics like "'s" and "n't", punctuation dropped), which agrees
with the PTB tokenizer on ordinary captions (see tests/test_evaluation.py) and needs no
Java. ``--score-tokenizer ptb`` uses the Java one, and ``--meteor`` adds METEOR, when ``java``
is on PATH. (SPICE needs Stanford CoreNLP models downloaded separately; not offered.)

Every figure is reported twice: on the scorers' own scale (BLEU/ROUGE-L in 0..1, CIDEr-D
as computed by coco-caption, usually 0..~3) and multiplied by 100, the scale papers use
("CIDEr 110" is 1.10 here), under separate keys so nobody confuses them.
"""

from __future__ import annotations

import shutil
from typing import Any, Mapping, Sequence

import regex

# The tokens coco-caption removes after PTB tokenisation (plus '"', which PTB turns into `` or '').
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
# PTB writes brackets as -LRB- etc.; lower-cased, these escape coco-caption's (upper-case) removal
# list and are scored as words. Reproduced so figures match the official pipeline.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = regex.compile(
    r"""n't(?!\w)|'(?:s|re|ve|ll|d|m)(?!\w)|\w+(?:[-.]\w+)*(?=n't(?!\w))|\w+(?:[-.]\w+)*|\.\.\.|--|[^\s\w]"""
)
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")


def simple_tokenize(text: str) -> str:
    """Lower-case, split like PTB ("dog's" -> "dog 's", "don't" -> "do n't"), drop punctuation."""
    text = text.lower().replace("’", "'")
    words = []
    for token in _TOKEN.findall(text):
        if token in _DROPPED:
            continue
        words.append(_BRACKETS.get(token, token))
    return " ".join(words)


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize_all(groups: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    if tokenizer == "simple":
        return {key: [simple_tokenize(t) for t in texts] for key, texts in groups.items()}
    if tokenizer == "ptb":
        if not java_available():
            raise RuntimeError("--score-tokenizer ptb needs java on PATH (the Stanford PTB tokenizer is a Java program)")
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": t} for t in texts] for key, texts in groups.items()})
    raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")


def score_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    tokenizer: str = "simple",
    meteor: bool = False,
) -> dict[str, float]:
    """Corpus-level metrics for one predicted caption per image against its references.

    ``references`` and ``predictions`` are keyed by image; only images present in both are
    scored (the caller reports the rest). Values are on the scorers' own scale.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [k for k in predictions if k in references and len(references[k]) > 0]
    if not keys:
        raise ValueError("no image has both a prediction and at least one reference caption")
    gts = _tokenize_all({k: list(references[k]) for k in keys}, tokenizer)
    res = _tokenize_all({k: [predictions[k]] for k in keys}, tokenizer)
    results: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        results[f"BLEU-{n}"] = float(value)
    results["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    results["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        if not java_available():
            raise RuntimeError("METEOR needs java on PATH")
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            results["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            scorer.meteor_p.kill()
    return results


def report(metrics: Mapping[str, float], **info: Any) -> dict[str, Any]:
    """The JSON report: both scales under separate keys, plus whatever describes the run."""
    return {
        **info,
        "metrics": dict(metrics),
        "metrics_x100": {name: round(100.0 * value, 2) for name, value in metrics.items()},
        "scale_note": "'metrics' are on the scorers' scale (BLEU/ROUGE-L in 0..1); 'metrics_x100' are x100 as in papers",
    }

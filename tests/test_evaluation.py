"""Caption metrics: tokenisation vs Stanford PTB, BLEU/ROUGE-L vs direct formulas, the evaluate CLI."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocoevalcap")

from gpt2_effnet.cli import main  # noqa: E402
from gpt2_effnet.evaluation import java_available, score_captions, simple_tokenize  # noqa: E402

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "The dog's ball is red, isn't it?",
    "Two people don't like (small) black-and-white cats!",
    "A woman's hands hold 3.5 apples; she can't eat them...",
    "Kids playing  baseball -- in the park",
    'A sign that says "STOP" near a road.',
    "It's a 1950's style diner with pots & pans",
]


def test_simple_tokenize_examples() -> None:
    assert simple_tokenize("A man riding a wave, on top of a surfboard.") == "a man riding a wave on top of a surfboard"
    assert simple_tokenize("The dog's ball isn't red!") == "the dog 's ball is n't red"
    assert simple_tokenize("A black-and-white cat (small)") == "a black-and-white cat -lrb- small -rrb-"


@pytest.mark.skipif(not java_available(), reason="the Stanford PTB tokenizer needs java")
def test_simple_tokenize_agrees_with_the_stanford_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    for i, caption in enumerate(CAPTIONS):
        assert simple_tokenize(caption) == ptb[str(i)][0], caption


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _direct_bleu(refs: dict[str, list[str]], hyps: dict[str, str], n_max: int) -> float:
    """Corpus BLEU (clipped n-gram precision, brevity penalty against the closest reference length)."""
    matched, total = [0] * n_max, [0] * n_max
    hyp_len = ref_len = 0
    for key, hyp in hyps.items():
        h = hyp.split()
        rs = [r.split() for r in refs[key]]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, n_max + 1):
            counts = _ngrams(h, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / n_max
    penalty = min(0.0, 1.0 - ref_len / hyp_len)
    return math.exp(log_p + penalty)


def _lcs(a: list[str], b: list[str]) -> int:
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
    return int(table[-1, -1])


def _direct_rouge_l(refs: dict[str, list[str]], hyps: dict[str, str], beta: float = 1.2) -> float:
    scores = []
    for key, hyp in hyps.items():
        h = hyp.split()
        precision = max(_lcs(h, r.split()) / len(h) for r in refs[key])
        recall = max(_lcs(h, r.split()) / len(r.split()) for r in refs[key])
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall else 0.0)
    return float(np.mean(scores))


REFS = {
    "img1": ["a dog is running on the grass", "the dog runs across a green field", "a brown dog running outside"],
    "img2": ["two cats sleep on a red sofa", "a pair of cats sleeping on a couch"],
    "img3": ["a man rides a wave on a surfboard", "a surfer riding a large wave"],
}
HYPS = {"img1": "a dog running on the grass", "img2": "two cats sleeping on a couch", "img3": "a man riding a wave"}


def test_bleu_and_rouge_match_direct_formulas() -> None:
    metrics = score_captions(REFS, HYPS)
    for n in (1, 2, 3, 4):
        assert metrics[f"BLEU-{n}"] == pytest.approx(_direct_bleu(REFS, HYPS, n), rel=1e-6)
    assert metrics["ROUGE-L"] == pytest.approx(_direct_rouge_l(REFS, HYPS), rel=1e-6)
    assert 0.0 < metrics["CIDEr-D"] < 10.0
    # Tokenisation is applied: case and punctuation do not change the figures.
    shouted = {k: v.upper() + "!" for k, v in HYPS.items()}
    assert score_captions(REFS, shouted) == pytest.approx(metrics)


def test_perfect_captions_score_top_marks_and_cider_rewards_consensus() -> None:
    refs = {f"i{i}": [f"a {c} cat on a {s} mat", f"the {c} cat sits on the {s} mat"]
            for i, (c, s) in enumerate([("red", "blue"), ("black", "green"), ("white", "brown"), ("grey", "pink")])}
    exact = {k: v[0] for k, v in refs.items()}
    wrong = {k: "a bowl of soup on a wooden table" for k in refs}
    good, bad = score_captions(refs, exact), score_captions(refs, wrong)
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert good["CIDEr-D"] > 1.0 > bad["CIDEr-D"]
    assert bad["BLEU-4"] < 0.01


def _write_references(folder: Path) -> Path:
    import csv

    for name in ("img1.png", "img2.png"):
        (folder / name).write_bytes(b"placeholder")  # scored from --predictions: never decoded
    path = folder / "refs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for key in ("img1", "img2", "img3"):
            for text in REFS[key]:
                writer.writerow([f"{key}.png", text])
    return path


def test_evaluate_cli_reports_both_scales_and_counts_skips(tmp_path, capsys) -> None:
    refs = _write_references(tmp_path)
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(
        json.dumps({"image": str(tmp_path / f"{k}.png"), "caption": HYPS[k]}) + "\n" for k in ("img1", "img2")
    ))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--predictions", str(predictions), "--csv", str(refs), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images_scored"] == 2
    assert result["skipped"] == {"missing_files": 0, "unreadable": 0, "no_prediction": 1}  # img3 has none
    expected = score_captions({k: REFS[k] for k in ("img1", "img2")}, {k: HYPS[k] for k in ("img1", "img2")})
    assert result["metrics"] == pytest.approx(expected)
    for name, value in result["metrics"].items():
        assert result["metrics_x100"][name] == pytest.approx(100 * value, abs=0.006)
    assert set(result["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert "1 uncaptioned" in capsys.readouterr().err


def test_predictions_are_matched_by_resolved_path_and_by_name_only_when_asked(tmp_path) -> None:
    from gpt2_effnet.commands.evaluate import match_predictions

    images = [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "y.png"), str(tmp_path / "b" / "y.png")]
    predictions = {
        str(tmp_path / "a" / ".." / "a" / "x.png"): "cap x",  # same file, other spelling
        "elsewhere/y.png": "cap y",  # name clash on the reference side: not matched
    }
    assert match_predictions(images, predictions) == {images[0]: "cap x"}
    assert match_predictions(images, predictions, by_name=True) == {images[0]: "cap x"}
    # Another folder's y.png is another picture unless the user says names identify images.
    assert match_predictions(images[:2], {"z/y.png": "cap y"}) == {}
    assert match_predictions(images[:2], {"z/y.png": "cap y"}, by_name=True) == {images[1]: "cap y"}


def test_evaluate_cli_names_bad_inputs(tmp_path, capsys) -> None:
    assert main(["evaluate", "--predictions", str(tmp_path / "p.jsonl"), "--csv", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
    refs = _write_references(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"file": "img1.png", "text": "x"}) + "\n")
    assert main(["evaluate", "--predictions", str(bad), "--csv", str(refs)]) == 2
    assert "'image' and 'caption'" in capsys.readouterr().err

"""`steerserve train vectors`: the CLI on tiny Llama and Qwen2 checkpoints (pairs files of texts and
chat conversations, personas; pca_diff and caa), both output formats loadable and equal, the
directions' defining properties, and errors naming the line and the field."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from steerserve.patches.steers.vectors import files
from steerserve.training.vectors import (
    Pair, VectorTrainingError, direction, last_token_states, load_pairs, parse_layers, persona_pairs,
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "steerserve.clients.cli", "train", "vectors", *args],
                          capture_output=True, text=True, timeout=600)


def write_pairs(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


PAIRS = [
    {"positive": "I love this wonderful sunny day", "negative": "I hate this miserable rainy day"},
    {"positive": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Great, thanks!"}],
     "negative": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Awful, sadly."}]},
    {"positive": "What a delightful surprise", "negative": "What a dreadful surprise"},
]


@pytest.mark.parametrize("arch,method", [("llama", "caa"), ("qwen2", "pca_diff")])
def test_cli_writes_both_formats_on_each_architecture(arch, method, tiny_llama, tiny_qwen2, tmp_path):
    model = tiny_llama if arch == "llama" else tiny_qwen2
    pairs = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    out = cli("--model", str(model), "--pairs", str(pairs), "--method", method, "--layers", "all",
              "--out", str(tmp_path / "v"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3 pairs" in out.stderr and "reading hidden states" in out.stderr  # progress
    a = files.check("v", tmp_path / "v.safetensors", 256, 4)
    b = files.check("v", tmp_path / "v.gguf", 256, 4)
    assert a.layers == b.layers == (0, 1, 2, 3) and a.norms == pytest.approx(b.norms)
    assert a.metadata["method"] == method and a.metadata["base_digest"] and a.format == "safetensors"
    _, da, _ = files.read_directions(tmp_path / "v.safetensors")
    _, db, _ = files.read_directions(tmp_path / "v.gguf")
    assert all(np.array_equal(da[i], db[i]) for i in da)
    if method == "pca_diff":
        assert all(n == pytest.approx(1.0, abs=1e-5) for n in a.norms)


def test_persona_pairs_and_default_layers(tiny_llama, tok):
    pairs = persona_pairs(tok, "happy", "sad", ["The weather today is", "My cat"])
    assert all("happy" in p.positive and "sad" in p.negative for p in pairs)
    assert all(p.positive.split("happy")[1] == p.negative.split("sad")[1] for p in pairs)  # same reply prefix
    assert len(pairs) == len(tok.tokenize("The weather today is")) + len(tok.tokenize("My cat"))
    assert parse_layers(None, 30) == list(range(1, 30))  # repeng's and llama.cpp's: no layer 0
    with pytest.raises(VectorTrainingError, match="out of range"):
        parse_layers("3,30", 30)


def test_directions_separate_the_pairs():
    """caa is the mean difference; pca_diff is unit norm, signed so that positives project above
    their negatives, and recovers a planted direction."""
    rng = np.random.default_rng(0)
    planted = rng.standard_normal(32)
    planted /= np.linalg.norm(planted)
    neg = rng.standard_normal((50, 32))
    pos = neg + planted * rng.uniform(2, 3, (50, 1)) + 0.05 * rng.standard_normal((50, 32))
    caa = direction(pos, neg, "caa")
    np.testing.assert_allclose(caa, (pos - neg).mean(0), rtol=1e-5)
    pca = direction(pos, neg, "pca_diff")
    assert np.linalg.norm(pca) == pytest.approx(1.0, abs=1e-5)
    assert pca @ planted > 0.99
    assert np.mean(pos @ pca > neg @ pca) > 0.9
    flipped = direction(neg, pos, "pca_diff")  # swapped roles: the sign follows the positives
    assert flipped @ planted < -0.99


def test_last_token_states_ignore_padding(tiny_llama, tok):
    """A text's state does not depend on the batch it is padded into (right padding, last real token)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    texts = ["short one", "a much longer text than the short one, with more tokens"]
    together = last_token_states(model, tok, texts, [1, 3], batch_size=2)
    alone = last_token_states(model, tok, texts[:1], [1, 3], batch_size=1)
    np.testing.assert_allclose(together[3][0], alone[3][0], atol=1e-4, rtol=1e-5)  # float32 batching noise


def test_pairs_file_errors_name_the_line_and_field(tmp_path, tok):
    cases = [
        ('{"positive": "a"}\n', ":1: expected an object"),
        ('{"positive": "a", "negative": "b"}\nnot json\n', ":2: not JSON"),
        ('{"positive": "a", "negative": 3}\n{"positive": "a", "negative": "b"}\n', ":1: negative: must be a string"),
        ('{"positive": "", "negative": "b"}\n{"positive": "a", "negative": "b"}\n', ":1: positive: empty"),
        ('{"positive": "a", "negative": "b"}\n', "1 pairs; at least 2"),
    ]
    for text, expected in cases:
        path = tmp_path / "p.jsonl"
        path.write_text(text)
        with pytest.raises(VectorTrainingError, match=expected):
            load_pairs(path, tok)
    assert load_pairs(write_pairs(tmp_path / "ok.jsonl", PAIRS), tok)[0] == Pair(PAIRS[0]["positive"],
                                                                                 PAIRS[0]["negative"])
    out = cli("--persona", "happy", "--out", str(tmp_path / "x"))
    assert out.returncode != 0 and "POSITIVE,NEGATIVE" in out.stderr


@pytest.mark.engine
def test_eval_vectors_command(tiny_llama, tmp_path):
    """`steerserve train eval-vectors` on a tiny model: every scale scored, the table written, scale 0
    the plain replies (the engine's unsteered path)."""
    from tiny_models import tiny_vectors

    out = subprocess.run([sys.executable, "-m", "steerserve.clients.cli", "train", "eval-vectors", "--model",
                          str(tiny_llama), "--vector", tiny_vectors(tiny_llama)["joy"], "--scales=-4,0,4", "--n", "3",
                          "--max-tokens", "6", "--out", str(tmp_path / "ev")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results["by_scale"]) == {"-4.0", "0.0", "4.0"}
    assert all(r["n"] == 3 and -1 <= r["compound"] <= 1 for r in results["by_scale"].values())
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    replies = {s["scale"]: [x["reply"] for x in samples if x["scale"] == s["scale"]] for s in samples}
    assert replies[-4.0] != replies[0.0] and replies[4.0] != replies[0.0]
    assert "| scale |" in (tmp_path / "ev" / "table.md").read_text()

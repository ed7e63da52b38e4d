"""Tiny models and datasets for tests: built here from a config, with a tokenizer trained locally."""

from __future__ import annotations

import csv
import random
from pathlib import Path

WORDS = "red green blue cat dog bird runs sits jumps fast slow big small the a on under near".split()


def write_pairs(directory: Path, *, train: int = 400, validation: int = 80, seed: int = 0) -> Path:
    """A learnable sentence-pair task: label 1 when both sentences share their first word."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", validation)):
        with (directory / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            for _ in range(n):
                a = rng.sample(WORDS, 5)
                b = rng.sample(WORDS, 5)
                same = rng.random() < 0.5
                if same:
                    b[0] = a[0]
                elif b[0] == a[0]:
                    b[0] = next(x for x in WORDS if x != a[0])
                w.writerow([" ".join(a), " ".join(b), int(b[0] == a[0])])
    return directory


def build_tiny_bert(directory: Path, corpus: list[str] | None = None) -> Path:
    """A 2-layer, 64-wide BERT with a WordPiece tokenizer trained on `corpus`, saved to `directory`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    corpus = corpus or [" ".join(random.Random(i).sample(WORDS, 6)) for i in range(200)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory

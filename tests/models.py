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


#: A ChatML chat template without generation markers (the loss then counts each conversation's last answer).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The same template with the {% generation %} markers that let the loss count every assistant turn.
CHATML_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = "red green blue black white".split()
ANIMALS = "cat dog bird fish fox".split()


def chat(colour: str, animal: str) -> list[dict[str, str]]:
    """A conversation with a learnable answer: the animal's name, then the colour, in capitals."""
    return [
        {"role": "user", "content": f"the {colour} {animal} sits"},
        {"role": "assistant", "content": f"{animal.upper()} {colour.upper()}"},
    ]


def write_chats(
    directory: Path, *, train: int = 200, validation: int = 20, seed: int = 0, fmt: str = "messages"
) -> Path:
    """Chat data in one of the text-generation formats (messages, prompt-completion, text) as jsonl."""
    import json

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", validation)):
        with (directory / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                turns = chat(rng.choice(COLOURS), rng.choice(ANIMALS))
                if fmt == "messages":
                    record: dict[str, object] = {"messages": turns}
                elif fmt == "prompt-completion":
                    record = {"prompt": turns[0]["content"], "completion": " " + turns[1]["content"]}
                else:
                    record = {"text": f"{turns[0]['content']} : {turns[1]['content']}"}
                f.write(json.dumps(record) + "\n")
    return directory


def build_tiny_llama(directory: Path, *, template: str | None = CHATML) -> Path:
    """A 2-layer, 64-wide Llama with a word-level tokenizer (ChatML special tokens) saved to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [*COLOURS, *ANIMALS, *(w.upper() for w in COLOURS + ANIMALS), "the", "sits", ":", "user",
             "assistant", "system", "a", "is"]  # fmt: skip
    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        model_max_length=256,
    )  # fmt: skip
    if template is not None:
        fast.chat_template = template
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=vocab["<s>"],
        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"], tie_word_embeddings=True,
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory


def write_preferences(
    directory: Path, *, train: int = 200, validation: int = 40, seed: int = 0, chat_turns: bool = True
) -> Path:
    """Preference pairs as jsonl with an explicit prompt: the chat() answer is chosen over one with the wrong
    colour or animal (the tiny Llama's words), as chat turns (TRL's conversational format) or as text."""
    import json

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", validation)):
        with (directory / f"{split}.jsonl").open("w") as f:
            for _ in range(n):
                colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
                prompt, answer = chat(colour, animal)
                if rng.random() < 0.5:
                    colour = rng.choice([c for c in COLOURS if c != colour])
                else:
                    animal = rng.choice([a for a in ANIMALS if a != animal])
                wrong = chat(colour, animal)[1]
                if chat_turns:
                    record: dict[str, object] = {"prompt": [prompt], "chosen": [answer], "rejected": [wrong]}
                else:
                    record = {"prompt": prompt["content"], "chosen": " " + answer["content"],
                              "rejected": " " + wrong["content"]}  # fmt: skip
                f.write(json.dumps(record) + "\n")
    return directory

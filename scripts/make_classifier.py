"""Builds a small sentiment classifier checkpoint (BERT-style) offline and deterministically.

The non-LLM model served with TorchServe's classic static batching beside the LLM. A word-level
tokenizer and a 2-layer BertForSequenceClassification are trained for a few seconds on
generated sentences (positive and negative words in neutral filler), enough to label plain
sentiment sentences correctly. Labels: 0 negative, 1 positive. Never touches the network.

    python scripts/make_classifier.py --out models/classifier
"""
import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

POSITIVE = ["good", "great", "excellent", "wonderful", "happy", "love", "amazing", "fantastic",
            "nice", "delightful", "superb", "enjoyed", "best", "pleasant", "brilliant"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "sad", "hate", "boring", "poor", "worst",
            "disappointing", "ugly", "broken", "annoying", "dreadful", "mediocre"]
FILLER = ["the", "a", "movie", "film", "food", "service", "was", "is", "really", "very", "this",
          "it", "i", "we", "found", "day", "book", "show", "and", "quite", "so", "experience"]
LABELS = {0: "negative", 1: "positive"}
STAMP = "make_classifier.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(n: int, rng: random.Random) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(2, 8))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        out.append((" ".join(words), label))
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    tok.train_from_iterator([" ".join(POSITIVE + NEGATIVE + FILLER)], trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=128)


def make_classifier(out_dir: str | Path, seed: int = 0, steps: int = 150) -> Path:
    """Train and save the checkpoint in ``out_dir``; returns it untouched if already built."""
    out_dir = Path(out_dir)
    settings = {"seed": seed, "steps": steps, "version": 1}
    stamp = out_dir / STAMP
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out_dir
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = sentences(32, rng)
        enc = tokenizer([s for s, _ in batch], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stamp.write_text(json.dumps(settings))
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/classifier"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    print(make_classifier(args.out, args.seed, args.steps))


if __name__ == "__main__":
    main()

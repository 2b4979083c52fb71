"""Trains the byte-level BPE tokenizer that the generated test and default models share.

Owns the training corpus (English prose that ships with Python, so it is local and needs no
download: the language reference in `pydoc_data.topics` and the standard library's docstrings,
with code examples and grammar rules dropped), the BPE training, the special tokens, the chat
template and how the tokenizer is saved. It must stay deterministic: the same Python install
gives the same tokenizer.json bytes on every run. It never touches model weights.
"""
import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded BPE merges: reproducible ties
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ast
import json
import sysconfig
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *ROLE_TOKENS)

DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

# Every turn is "<|role|>\n{content}</s>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):
        return False  # grammar rules, code examples and tables are indented
    return not set(lines[-1]) <= set("*=-~^")  # section titles underlined with ****


def _prose(text: str) -> str:
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    return "\n".join(" ".join(p.split()) for p in paragraphs if _is_prose(p))


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, DOCUMENTED))
    return "\n".join(filter(None, (_prose(ast.get_docstring(n) or "") for n in nodes)))


@lru_cache(maxsize=1)
def corpus_documents() -> tuple[str, ...]:
    """English prose, one string per document: each language-reference topic (sorted by name),
    then the docstrings of each top-level standard-library module (sorted by file name)."""
    from pydoc_data.topics import topics

    documents = [_prose(topics[name]) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents += [_module_docstrings(path) for path in sorted(stdlib.glob("*.py"))]
    return tuple(d for d in documents if d)


@lru_cache(maxsize=4)
def _train_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_documents(), trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    assert tokenizer.get_vocab_size() == vocab_size, "corpus too small for the vocabulary"
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A fresh tokenizer with `vocab_size` entries; training is cached per vocabulary size."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_json(vocab_size)),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json that carries the chat template inline."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name every transformers knows
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

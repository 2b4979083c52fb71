"""Detokenizer: incremental text equals a full decode; no split characters; stop strings."""
import pytest
from transformers import AutoTokenizer

from engine.detokenizer import Detokenizer

TEXT = "Plain words, then héllo wörld 日本語 🙂 and the end."


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _feed(tok, ids, stop=()):
    d = Detokenizer(tok, tok.encode("Prompt:"), list(stop))
    deltas = []
    for i in ids:
        text, stopped = d.add(i)
        deltas.append(text)
        if stopped:
            return deltas, True
    deltas.append(d.flush())
    return deltas, False


def test_incremental_matches_full_decode_and_never_splits_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT.split())       # multi-byte characters span several tokens
    deltas, stopped = _feed(tokenizer, ids)
    assert "".join(deltas) == TEXT and not stopped
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_token_boundaries_is_trimmed(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, stopped = _feed(tokenizer, ids, stop=["日本"])
    assert stopped and "".join(deltas) == "Plain words, then héllo wörld "
    deltas, stopped = _feed(tokenizer, ids, stop=["words, th", "zzz"])
    assert stopped and "".join(deltas) == "Plain "
    deltas, stopped = _feed(tokenizer, ids, stop=["not there"])
    assert not stopped and "".join(deltas) == TEXT


def test_stop_strings_hold_back_only_a_possible_prefix(tokenizer):
    ids = tokenizer.encode("abcdefghij", add_special_tokens=False)
    deltas, _ = _feed(tokenizer, ids, stop=["xyz"])
    sent_before_flush = "".join(deltas[:-1])
    assert sent_before_flush == "abcdefghij"[:len(sent_before_flush)]
    assert len(sent_before_flush) >= len("abcdefghij") - 2


def test_an_output_ending_inside_a_character_ends_as_a_full_decode(tokenizer):
    ids = tokenizer.encode("ab 日本", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas, _ = _feed(tokenizer, ids[:cut])
    assert "\ufffd" not in "".join(deltas[:-1])
    assert "".join(deltas) == tokenizer.decode(ids[:cut])
    deltas, stopped = _feed(tokenizer, ids[:cut], stop=["b"])
    assert stopped and "".join(deltas) == "a"

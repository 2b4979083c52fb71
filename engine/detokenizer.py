"""Detokenizer: turns one sequence's new token ids into text deltas, and finds stop strings.

Decoding is incremental: each step decodes a short window of recent tokens, so the cost per
token stays constant however long the output grows. A delta that would end inside a multi-byte
character (the tokenizer yields U+FFFD) is held until the character completes; a sequence that
ends inside one ends with U+FFFD, as decoding its whole output does. Text that might be the
start of a stop string is held back until it is known not to be one.
"""
from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 6    # prompt tokens decoded before the output so spacing rules match


class Detokenizer:
    """Per-sequence decoding state; ``add`` returns the new text and whether a stop string hit."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int],
                 stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.window_start = 0             # first id of the decode window
        self.read = len(self.ids)         # ids before this are already in ``text``
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""                    # all output text so far (after any stop trim)
        self.sent = 0                     # characters of ``text`` already returned
        self.stopped = False              # a stop string ended the text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text ready to send, stopped on a stop string)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.window_start:self.read])
        after = self._decode(self.ids[self.window_start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self.window_start, self.read = self.read, len(self.ids)
            if self.stop and self._append_and_check(new):
                self.stopped = True
                return self.flush(), True
            if not self.stop:
                self.text += new
        return self._ready(), False

    def _append_and_check(self, new: str) -> bool:
        """Append ``new``; trim the text at the first stop string that now appears."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _ready(self) -> str:
        end = max(self.sent, len(self.text) - self.hold) if self.stop else len(self.text)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def flush(self) -> str:
        """All text not yet returned, an incomplete last character included (as U+FFFD,
        unless a stop string ended the text before it): call once the sequence finishes."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.window_start:self.read])
            self.text += self._decode(self.ids[self.window_start:])[len(before):]
            self.read = len(self.ids)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

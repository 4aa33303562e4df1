"""Token ids -> text as it grows, for streaming: each new token gives the text added since the last,
held back while it could still change (a character cut between tokens, trailing spaces, the start
of a stop string). The streamed pieces join to exactly the final text, which is the whole decode,
stripped, up to the first stop string."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already given out
        self.stopped = False  # a stop string was found: the text ends before it

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def push(self, token: int) -> str:
        """Adds a token; returns the text that is now certain (possibly empty)."""
        self.tokens.append(token)
        text = self._text()
        cut = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cut:
            self.stopped = True
            return self._give(text[:min(cut)].rstrip())
        safe = len(text.rstrip())
        if text.endswith("\ufffd"):  # a character split across tokens
            safe = min(safe, len(text) - 1)
        for s in self.stop:  # a suffix that may begin a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if s.startswith(text[-k:]):
                    safe = min(safe, len(text) - k)
                    break
        return self._give(text[:safe])

    def finish(self) -> str:
        """The rest of the text once no token follows."""
        if self.stopped:
            return ""
        return self._give(self._text().rstrip())

    def _give(self, text: str) -> str:
        if len(text) <= self.sent:
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    @property
    def text(self) -> str:
        t = self._text()
        cut = [i for i in (t.find(s) for s in self.stop) if i >= 0]
        return (t[:min(cut)] if cut else t).strip()

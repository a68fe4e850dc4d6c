"""Streaming: hand out the answer while it is generated.

The generator calls `put(tokens [B])` after every step (-1 for rows that have finished) and `end()`
once. `TextDeltas` turns one row's tokens into the newly settled part of its answer, so that the parts
add up to the final answer; `TextStreamer` prints them for one row (run_infer.py), the server sends them
as server-sent events (visual_mllm.serve).
"""
import sys


class TextDeltas:
    def __init__(self, render, holdback=0):
        """render(generated_ids) -> the answer text so far (the family's decode + post-processing).

        holdback: tokens kept back until the answer ends: the longest stop sequence minus one, so that
        the start of a stop sequence (MiniGPT-4's "##" before "#") is never given out.
        """
        self.render = render
        self.holdback = holdback
        self.tokens = []
        self.text = ""  # what was given out so far (after finish: the whole answer)

    def add(self, token):
        """The text that `token` settles ("" when none)."""
        self.tokens.append(int(token))
        text = self.render(self.tokens[:-self.holdback] if self.holdback else self.tokens)
        # Hold back the last character: an incomplete UTF-8 sequence, or punctuation that the
        # post-processing may still change once its right-hand neighbour arrives.
        text = text.rstrip("\ufffd")[:-1]
        return self._extend(text) or ""

    def finish(self):
        """The rest of the answer; None when the final answer does not continue what was given out (the
        post-processing changed it as a whole, e.g. a later answer marker): `text` is then the whole answer."""
        text = self.render(self.tokens)
        rest = self._extend(text)
        self.text = text
        return rest

    def _extend(self, text):
        if not text.startswith(self.text):
            return None
        rest, self.text = text[len(self.text):], text
        return rest


class TextStreamer:
    """Prints the answer of one row of the batch as it grows (see TextDeltas for render and holdback)."""

    def __init__(self, render, row=0, stream=None, holdback=0):
        self.deltas = TextDeltas(render, holdback)
        self.row = row
        self.stream = stream or sys.stdout

    def put(self, tokens):
        token = int(tokens[self.row])
        if token >= 0:
            self.stream.write(self.deltas.add(token))
            self.stream.flush()

    def end(self):
        rest = self.deltas.finish()
        self.stream.write(("\n" + self.deltas.text if rest is None else rest) + "\n")
        self.stream.flush()

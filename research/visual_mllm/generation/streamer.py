"""Streaming: print the answer while it is generated.

The generator calls `put(tokens [B])` after every step (-1 for rows that have finished) and `end()`
once. `TextStreamer` follows one row and prints the newly settled part of its answer each time, so that
what it prints adds up to the final answer.
"""
import sys


class TextStreamer:
    def __init__(self, render, row=0, stream=None, holdback=0):
        """render(generated_ids) -> the answer text so far (the family's decode + post-processing).

        holdback: tokens kept back until the answer ends: the longest stop sequence minus one, so that
        the start of a stop sequence (MiniGPT-4's "##" before "#") is never printed.
        """
        self.render = render
        self.row = row
        self.stream = stream or sys.stdout
        self.holdback = holdback
        self.tokens = []
        self.printed = ""

    def put(self, tokens):
        token = int(tokens[self.row])
        if token >= 0:
            self.tokens.append(token)
            self._flush(final=False)

    def end(self):
        self._flush(final=True)
        self.stream.write("\n")
        self.stream.flush()

    def _flush(self, final):
        text = self.render(self.tokens if final or not self.holdback else self.tokens[:-self.holdback])
        if not final:
            # Hold back the last character: an incomplete UTF-8 sequence, or punctuation that the
            # post-processing may still change once its right-hand neighbour arrives.
            text = text.rstrip("\ufffd")[:-1]
        if text.startswith(self.printed):
            self.stream.write(text[len(self.printed):])
            self.printed = text
        elif final:  # the answer changed as a whole (e.g. a later answer marker): print it again
            self.stream.write("\n" + text)
            self.printed = text
        self.stream.flush()

"""An interactive multi-turn chat (`run_infer.py --chat`): one image per conversation, commands, history.

Every question is answered with the conversation's image (if any) and its earlier turns, the way the
reference demos re-insert the image at the front of every turn. The history is kept within the
context: when prompt + answer would not fit, the oldest turns are dropped and the session says so.
"""
import sys

from .inference import ChatRequest
from .processing.image import load_image

HELP = """commands:
  /image PATH   start a new conversation about the image at PATH (/image none: without an image)
  /clear        forget the turns so far (the image stays)
  /history      show the turns kept so far
  /help         show this help
  /quit         leave (Ctrl-D too)
anything else is a question about the current image (or a text-only question without one)"""


def dropped_note(history, result):
    """What to tell the user when turns of `history` did not fit the context (None when all did)."""
    count = len(history) - len(result.history_used)
    return f"(the context is full: the {count} oldest turn(s) were dropped from the history)" if count else None


class ChatSession:
    """State of one chat: the image, the turns, and the command loop.

    run: run(requests, stream) -> ChatResults (the generate or pipeline mode).
    on_turn: called as on_turn(fields, result) after every answered question (e.g. to write a record).
    """

    def __init__(self, run, image_path=None, english=False, stream=False, on_turn=None, out=None, template=None):
        self.run = run
        self.english = english
        self.template = template  # the family's prompt template (None: its default)
        self.stream = stream
        self.on_turn = on_turn
        self.out = out or sys.stdout
        self.image_path, self.image = None, None
        self.history = []
        if image_path is not None:
            self.set_image(image_path)

    def say(self, text):
        print(text, file=self.out, flush=True)

    def set_image(self, path):
        """Start a new conversation about the image at `path` (None: without an image)."""
        self.image = None if path is None else load_image(path)  # ImageLoadError names the file
        self.image_path = path
        self.history = []

    def describe_image(self):
        return f"image {self.image_path}" if self.image_path is not None else "no image (text-only)"

    def ask(self, question):
        request = ChatRequest(prompt=question, image=self.image, history=list(self.history), english=self.english,
                              template=self.template)
        if self.stream:
            print("answer: ", end="", file=self.out, flush=True)
        result = self.run([request], self.stream)[0]
        if not self.stream:
            self.say(f"answer: {result.response}")
        note = dropped_note(self.history, result)
        if note:
            self.say(note)
        self.history = list(result.history_used) + [(question, result.response)]
        if self.on_turn is not None:
            fields = {"image": self.image_path, "prompt": question,
                      "history": [list(turn) for turn in result.history_used], "english": self.english}
            if self.template is not None:
                fields["template"] = self.template
            self.on_turn(fields, result)

    def handle(self, line):
        """Act on one input line; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            try:
                self.ask(line)
            except ValueError as err:  # unreadable image, prompt too long
                self.say(f"error: {err}")
            return True
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command in ("/quit", "/exit"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/clear":
            self.history = []
            self.say(f"history cleared; {self.describe_image()}")
        elif command == "/history":
            self.say(f"{self.describe_image()}; {len(self.history)} turn(s)")
            for number, (question, answer) in enumerate(self.history, 1):
                self.say(f"  {number}. Q: {question}\n     A: {answer}")
        elif command == "/image":
            if not argument:
                self.say("error: /image needs a path (or 'none')")
                return True
            try:
                self.set_image(None if argument.lower() == "none" else argument)
                self.say(f"new conversation: {self.describe_image()}")
            except ValueError as err:
                self.say(f"error: {err}")
        else:
            self.say(f"unknown command {command}; /help lists the commands")
        return True

    def loop(self, read=input):
        """Read lines with `read(prompt)` until /quit or end of input."""
        self.say(f"chat: {self.describe_image()}. /help lists the commands.")
        while True:
            try:
                line = read("> ")
            except EOFError:
                self.say("")
                return
            if not self.handle(line):
                return

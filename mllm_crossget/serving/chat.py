"""``crossget chat``: talk to a LLaVA model about an image in the terminal, CrossGET on or off.

Answers stream as they are generated; after each one a status line tells how many visual
tokens the image used, the time to the first token and the decode rate, so the effect of a
budget can be felt as well as read. Commands: ``/image PATH``, ``/budget K|full``,
``/method NAME``, ``/reset``, ``/help``, ``/quit``.

Turns: a model trained on one question per image (the testbed reference model) answers a
second question in the same conversation with noise, so such a model is chatted with one turn
at a time: each question goes with the image alone and the history is not sent. ``--turns
auto`` (default) decides from the model: ``"single_turn": true/false`` in its config.json if
present, else single-turn when the processor has no chat template (the testbed's
``USER: ... ASSISTANT:`` format), multi-turn when it has one. ``--turns single|multi``
overrides. Without ``--image`` the chat is text-only until ``/image PATH``.

``/budget 0`` is refused, as the API and the server refuse 0: ``/budget full`` is CrossGET
off.

    crossget chat --model reference --image photo.jpg --budget 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, UnidentifiedImageError

from .engine import (
    FULL,
    METHODS,
    ChatMessage,
    Engine,
    GenerationResult,
    InvalidSetting,
    Sampling,
    Setting,
    add_model_arguments,
    engine_from_args,
    make_setting,
    parse_budget,
)

HELP = """commands:
  /image PATH     use another image (starts a new conversation)
  /budget K|full  visual tokens per image (K >= 1), or full (CrossGET off); keeps the
                  conversation
  /method NAME    token-reduction method: {methods}
  /reset          forget the conversation (keeps the image and the setting)
  /help           this text
  /quit           leave (so do Ctrl-D and Ctrl-C)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossget chat",
        description="Chat with a LLaVA model about an image, tokens streamed, with "
        "a status line per answer (visual tokens, time to first token, tokens/s). Models "
        "without multi-turn training (the testbed reference model) answer each question on "
        "its own (see --turns). " + HELP.format(methods=", ".join(METHODS)).replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image to talk about (without it the chat is text-only until /image PATH)",
    )
    parser.add_argument(
        "--turns",
        choices=TURN_MODES,
        default="auto",
        help="single: each question answered on its own with the image, history not sent "
        "(models trained on one question per image, such as the reference model); multi: the "
        "conversation is sent each turn; auto (default): the model config's single_turn flag "
        "if it has one, else single when the processor has no chat template",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    parser.add_argument("--system", default=None, help="optional system text before the chat")
    return parser


TURN_MODES = ("auto", "single", "multi")


def single_turn_model(model: Any, processor: Any) -> bool:
    """True for a model without multi-turn training: ``config.single_turn`` when the model
    says, else no chat template (the testbed format, trained one question per image)."""
    flag = getattr(model.config, "single_turn", None)
    if isinstance(flag, bool):
        return flag
    return not getattr(processor, "chat_template", None)


def load_image(path: Path) -> Image.Image:
    """Open and decode now, so a bad file is reported at the command, not mid-answer."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise InvalidSetting(f"cannot read image {path}: {error}") from error


def status_line(result: GenerationResult) -> str:
    visual = "+".join(str(n) for n in result.visual_tokens) or "0"
    first = "-" if result.first_token_s is None else f"{result.first_token_s:.2f} s"
    return (
        f"[{visual} visual tokens | {result.setting.describe()} | first token {first} | "
        f"{result.tokens_per_s:.1f} tokens/s | {result.completion_tokens} tokens | "
        f"{result.prompt_tokens} prompt tokens]"
    )


class ChatSession:
    """The conversation state and the command interpreter, separate from terminal I/O."""

    def __init__(
        self,
        engine: Engine,
        sampling: Sampling,
        out: TextIO,
        system: str | None,
        method: str = "crossget",
        single_turn: bool = False,
    ) -> None:
        self.engine = engine
        self.single_turn = single_turn  # keep no history: each question on its own
        self.method = method  # what /budget K turns on while the setting is full
        self.sampling = sampling
        self.out = out
        self.system = system
        self.setting = engine.default
        self.image: Image.Image | None = None
        self.history: list[ChatMessage] = []

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run one ``/command``; returns False when the user wants to leave."""
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP.format(methods=", ".join(METHODS)))
        elif name == "reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "image":
            if not argument:
                self.say("usage: /image PATH")
                return True
            self.image = load_image(Path(argument).expanduser())
            self.history.clear()
            self.say(f"(image {argument}; new conversation)")
        elif name == "budget":
            budget = parse_budget(argument or "?")
            self.switch(Setting() if budget is None else make_setting(self.method, budget))
        elif name == "method":
            method = argument.lower()
            if method == FULL:
                self.switch(Setting())
            elif self.setting.visual_tokens is None:
                make_setting(method, 1)  # validates the name
                self.method = method
                self.say(f"(method {method}: takes effect with /budget K)")
            else:
                self.switch(make_setting(method, self.setting.visual_tokens))
        else:
            self.say(f"unknown command /{name}; /help lists them")
        return True

    def switch(self, setting: Setting) -> None:
        tokens = self.engine.check(setting)
        self.setting = setting
        self.method = setting.method if setting.method != FULL else self.method
        self.say(f"({setting.describe()}: {tokens} visual tokens per image)")

    def ask(self, question: str) -> GenerationResult:
        # The image rides on the conversation's first user turn; later turns refer back to it.
        images = [self.image] if self.image is not None and not self.history else []
        message = ChatMessage("user", question, images)
        system = [ChatMessage("system", self.system)] if self.system else []
        result = self.engine.generate(
            [*system, *self.history, message],
            setting=self.setting,
            sampling=self.sampling,
            on_text=lambda piece: print(piece, end="", file=self.out, flush=True),
        )
        self.say("")
        self.say(status_line(result))
        if self.single_turn:
            return result  # the next question starts afresh (with the image again)
        self.history += [
            ChatMessage("user", question, images),
            ChatMessage("assistant", result.text.strip()),
        ]
        return result


def run(session: ChatSession, stdin: TextIO) -> None:
    """Read lines until /quit or end of input; a scripted stdin echoes each question."""
    interactive = stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    break
            else:
                if not interactive:
                    session.say(f"you> {line}")
                print("assistant> ", end="", file=session.out, flush=True)
                session.ask(line)
        except InvalidSetting as error:
            session.say(f"error: {error}")
        except KeyboardInterrupt:
            session.say("\n(interrupted)")
        except Exception as error:  # a failed answer should not end the conversation
            session.say(f"\nerror: {type(error).__name__}: {error}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("crossget chat: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        engine = engine_from_args(args)
        image = None if args.image is None else load_image(args.image)
    except (OSError, InvalidSetting) as error:
        print(f"crossget chat: {error}", file=sys.stderr)
        return 2
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature or None)
    single = (
        single_turn_model(engine.model, engine.processor)
        if args.turns == "auto"
        else args.turns == "single"
    )
    session = ChatSession(engine, sampling, sys.stdout, args.system, args.method, single)
    session.image = image
    tokens = engine.check(engine.default)
    print(
        f"crossget chat: {engine.name}, {engine.default.describe()}, {tokens} visual tokens "
        f"per image{'' if image is None else f', image {args.image}'}. /help for commands.",
        flush=True,
    )
    if single:
        print(
            "(single-turn model: each question is answered on its own about the image; "
            "earlier turns are not sent. --turns multi sends them)",
            flush=True,
        )
    if image is None:
        print("(no --image: text-only; /image PATH adds one)", flush=True)
    run(session, sys.stdin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

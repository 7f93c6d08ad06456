"""`python -m blendin_cpp chat`: talk to a base + guide pair in the terminal.

Both models read the same conversation: the guide through its chat template, the base as a plain
transcript. Each turn extends what the models read in the turn before, so the engine reuses their
KV caches and decodes only the new tokens. Tokens are coloured by who wrote them.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterator

from . import demo, real_models
from .options import add_blend_args, add_model_args, blender_from_args, json_safe, parse_alpha, sampling_kwargs
from ._core import BlendError
from .blender import METHODS, RANGES, REPETITION, Blender, Step
from .chat_template import base_transcript

# Where base_transcript starts the user's next turn: the base must stop there, not write it.
NEXT_QUESTION = "\nQuestion:"

COLORS = {"base": "", "blend": "\x1b[33m", "guide": "\x1b[32m"}  # base plain, blend yellow, guide green
RESET = "\x1b[0m"
DIM = "\x1b[2m"

# /set NAME VALUE for the blending settings (checked by Blender.configure) ...
BLEND_SETTINGS = {"gamma": "gamma", "alpha": "alpha", "beta": "beta", "lambda": "lambda_",
                  "max_intervention_rate": "max_intervention_rate", "guide_ends": "guide_ends"}
# ... and for sampling and the repetition controls; the core checks every value against its
# ranges before a setting changes
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "ignore_eos", *REPETITION)

# The chat's (and the server's) defaults, chosen by measurement (docs/design.md section 3.6): where
# they differ from the core's, greedy decoding of small models looped on ordinary requests.
# The chat's system prompt on a real pair (not the demo pair, trained on questions alone), chosen by
# measurement among three (docs/design.md section 9): asked for short answers and short lists, the
# guide ends 94% of its answers instead of 50%, and the blends follow.
CHAT_SYSTEM = "Keep your answers short: at most three sentences, or a list of at most three items."
CHAT_DEFAULTS = {"max_tokens": 256, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                 "guide_ends": True, "frequency_penalty": 0.3, "dry_multiplier": 0.8, "loop_gate": 4}


HELP = """\
Type a message and press Enter. A line ending in \\ continues on the next line; text between
\"\"\" marks can span lines. Ctrl+C stops an answer (the partial answer stays in the conversation);
Ctrl+D, or Ctrl+C twice at the prompt, leaves.

  /help                 this text
  /stats                the last answer's and the session's diagnostics, and the settings
  /set NAME VALUE       change a setting: gamma, alpha (a number or auto), beta, lambda,
                        max_intervention_rate (a number or none), guide_ends (0 or 1),
                        temperature, top_p, top_k,
                        min_p, seed, max_tokens, ignore_eos; the repetition controls
                        presence_penalty, frequency_penalty, repeat_penalty, repeat_last_n,
                        dry_multiplier, dry_base, dry_allowed_length, dry_sequence_breakers
                        (a JSON list), loop_gate; /set av NAME SCALE turns an Alignment Vector
  /method NAME          switch the method ({methods})
  /system [TEXT]        set the system prompt (without TEXT: remove it)
  /reset                start a new conversation
  /save FILE            write the conversation, with each token's source, as JSON
  /bye                  leave"""


@dataclass
class Turn:
    """One request and its answer. `stats` is the engine's statistics of a finished answer and
    None for an answer stopped with Ctrl+C."""
    request: str
    steps: list[Step]
    stats: dict | None

    @property
    def answer(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def interrupted(self) -> bool:
        return self.stats is None


class Chat:
    """A conversation with a Blender: the turns so far, the system prompt and the sampling
    settings (blending settings live in `blender.defaults`).

    Turns that no longer fit the context stay in `turns` (for /save) but are left out of the
    prompts: `turns[:first]` are dropped."""

    def __init__(self, blender: Blender, sampling: dict, system: str | None = None):
        self.blender = blender
        self.sampling = {k: v for k, v in sampling.items() if k != "stop"}
        self.stop = [NEXT_QUESTION, *sampling.get("stop", ())]
        self.system = system
        self.turns: list[Turn] = []
        self.first = 0
        self.session: list[Turn] = []  # every turn since the start, across /reset

    def messages(self, request: str | None = None) -> list[dict]:
        """The conversation as chat messages (the turns in context, then `request`)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns[self.first:]:
            out += [{"role": "user", "content": t.request}, {"role": "assistant", "content": t.answer}]
        if request is not None:
            out.append({"role": "user", "content": request})
        return out

    def models(self) -> dict:
        b = self.blender
        return {role: m for role, m in (("base", b.base), ("guide", b.guide), ("anti", b.anti)) if m is not None}

    def prompt_texts(self, request: str) -> tuple[str, list[dict] | None]:
        """The base's and the guide's prompts for the next answer, as `Blender.generate` takes them.
        The base's is `base_transcript` with every answer exactly as the base read it after
        "Answer:" (base_transcript strips answers and adds a space, which would no longer match
        the tokens in the base's cache). The guide's are the messages, for its template (which
        renders answers as they are); a guide without a template reads the base's text (None)."""
        messages = self.messages(request)
        base, pending = "", []
        for m in messages:
            if m["role"] == "assistant":
                base += base_transcript(pending) + m["content"] + "\n"
                pending = []
            else:
                pending.append(m)
        base += base_transcript(pending)
        guide = self.blender.guide
        return base, messages if guide is not None and guide.chat_template else None

    def n_ctx(self) -> int:
        return min(m.n_ctx_seq for m in self.models().values())

    def prompt_tokens(self, request: str) -> int:
        """Tokens of the longer of the two prompts for `request`."""
        return max(len(t) for t in self.blender.prompts(*self.prompt_texts(request)))

    def make_room(self, request: str) -> int:
        """Drop the oldest turns until the prompt leaves room for an answer (max_tokens, at most
        half the context). Returns how many turns were dropped."""
        room = min(self.sampling["max_tokens"], self.n_ctx() // 2)
        dropped = 0
        while self.first < len(self.turns) and self.prompt_tokens(request) + room > self.n_ctx():
            self.first += 1
            dropped += 1
        return dropped

    def ask(self, request: str) -> Iterator[Step]:
        """Stream the answer to `request`. The turn joins the conversation when the stream ends,
        and also when it is stopped early (close() or Ctrl+C) after the first token, then marked
        interrupted; a request the engine refuses (ValueError: too long, a bad setting) does not."""
        steps: list[Step] = []
        try:
            for step in self.blender.generate(*self.prompt_texts(request), stop=self.stop, **self.sampling):
                steps.append(step)
                yield step
        except (KeyboardInterrupt, GeneratorExit):
            if steps:  # stopped before the first token: the request is withdrawn
                self._add(Turn(request, steps, None))
            raise
        self._add(Turn(request, steps, dict(self.blender.last_stats)))

    def _add(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.session.append(turn)

    def set(self, name: str, text: str) -> None:
        """Change one setting from its text form; ValueError (the message says why) if it is
        unknown or out of range. `av NAME SCALE` turns an Alignment Vector's knob (--av)."""
        if name == "av":
            parts = text.split()
            if len(parts) != 2:
                loaded = ", ".join(self.blender.base.adapter_names) or "none: start the chat with --av PATH:SCALE"
                raise ValueError(f"usage: /set av NAME SCALE (NAME: {loaded})")
            self.set_av(*parts)
            return
        if name in BLEND_SETTINGS:
            if name == "alpha":
                value = parse_alpha(text)
            elif name == "max_intervention_rate" and text.lower() == "none":
                value = None
            elif name == "guide_ends":
                if text not in ("0", "1"):
                    raise ValueError(f"guide_ends must be 0 or 1, got {text}")
                value = text == "1"
            else:
                value = _number(name, text, float)
            self.blender.configure(**{BLEND_SETTINGS[name]: value})
        elif name in SAMPLING:
            if name == "ignore_eos":
                if text not in ("0", "1"):
                    raise ValueError(f"ignore_eos must be 0 or 1, got {text}")
                value = text == "1"
            elif name == "dry_sequence_breakers":
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = None
                if not isinstance(value, list):
                    raise ValueError('dry_sequence_breakers takes a JSON list of strings, e.g. ["\\n", ":"]')
            else:
                value = _number(name, text, int if RANGES[name][4] else float)
            trial = {**self.sampling, name: value}
            self.blender.gen_params(**trial).validate()  # the core's ranges, before anything changes
            self.sampling[name] = value
        else:
            raise ValueError(f"unknown setting {name!r}; one of: {', '.join([*BLEND_SETTINGS, *SAMPLING])}")

    def set_av(self, name: str, text: str) -> None:
        base = self.blender.base
        if name not in base.adapter_names:
            raise ValueError(f"no Alignment Vector named {name!r}; loaded: {', '.join(base.adapter_names) or 'none'}")
        scales = base.adapter_scales()
        scales[base.adapter_names.index(name)] = _number("av scale", text, float)
        base.set_adapter_scales(scales)  # the blender re-reads its caches at the next turn

    def settings(self) -> dict:
        d = dict(self.blender.defaults)
        d["lambda"] = d.pop("lambda_")
        av = dict(zip(self.blender.base.adapter_names, self.blender.base.adapter_scales()))
        return {**d, **self.sampling, "stop": self.stop, "system": self.system, **({"av": av} if av else {})}

    def reset(self) -> None:
        """Start a new conversation (the settings and the session statistics stay)."""
        self.turns, self.first = [], 0

    def save(self, path: str) -> None:
        """The whole conversation (dropped turns included) with every token's source, as JSON."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns:
            messages.append({"role": "user", "content": t.request})
            messages.append({"role": "assistant", "content": t.answer, "interrupted": t.interrupted,
                             "tokens": [{"text": s.text, "token": s.token, "source": s.source, "alpha": s.alpha,
                                         "pb_max": s.pb_max, "pg_max": s.pg_max} for s in t.steps],
                             "stats": t.stats})
        doc = {"models": {role: m.path for role, m in self.models().items()}, "settings": self.settings(),
               "dropped_turns": self.first, "messages": messages}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(json_safe(doc), f, ensure_ascii=False, indent=1)


def _number(name: str, text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, not {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {text!r}")
    return value


def summary(stats: dict) -> str:
    """One line after each answer."""
    line = (f"[{stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, intervention rate "
            f"{stats['intervention_rate']:.0%}, mean alpha {stats['mean_alpha']:.2f}")
    return line + ("]" if stats["finish_reason"] == "stop" else f", ended by {stats['finish_reason']}]")


class Terminal:
    """The chat loop on standard input and output: reading requests, slash commands, streaming
    coloured answers. Answers and command output go to stdout; notes, summaries and warnings to
    stderr."""

    def __init__(self, chat: Chat, *, color: bool, interactive: bool):
        self.chat = chat
        self.color = color
        self.interactive = interactive

    def paint(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.color and code and text else text

    def note(self, text: str) -> None:
        sys.stdout.flush()
        print(self.paint(text, DIM), file=sys.stderr, flush=True)

    def run(self) -> int:
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())
            # Ctrl+C stops an answer: make sure it raises KeyboardInterrupt even when the chat was
            # started with SIGINT ignored (a background job of a script inherits that)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            legend = ", ".join(self.paint(source, code) for source, code in COLORS.items())
            print(f"method {self.chat.blender.defaults['method']}; tokens by source: {legend}. "
                  "/help for commands, Ctrl+D to leave.", file=sys.stderr)
        leaving = False
        while True:
            try:
                text = self.read_request()
            except EOFError:
                break
            except KeyboardInterrupt:
                if leaving:
                    break
                print(file=sys.stderr)
                self.note("(Ctrl+C again or Ctrl+D to leave)")
                leaving = True
                continue
            leaving = False
            try:
                if text.startswith("/"):
                    if not self.command(text):
                        return 0
                elif text.strip():
                    self.answer(text)
            except KeyboardInterrupt:  # after an answer or during a command: back to the prompt
                print(file=sys.stderr)
        if self.interactive:
            print(file=sys.stderr)
        return 0

    def read_request(self) -> str:
        """One request: a line; a line ending in \\ continues; a block between \"\"\" marks."""
        first, more = (">>> ", "... ") if self.interactive else ("", "")
        line = input(first)
        if line.startswith('"""'):
            lines = [line[3:]]
            while not lines[-1].endswith('"""'):
                lines.append(input(more))
            return "\n".join(lines)[:-3].strip("\n")
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(more))
        return "\n".join(lines)

    def answer(self, request: str) -> None:
        chat = self.chat
        n_turns, stream, at_line_start = len(chat.turns), None, True
        try:
            dropped = chat.make_room(request)
            if dropped:
                self.note(f"(the conversation outgrew the context of {chat.n_ctx()} tokens: dropped the "
                          f"{dropped} oldest turn(s); the models read the rest again)")
            stream = chat.ask(request)
            for step in stream:
                sys.stdout.write(self.paint(step.text, COLORS[step.source]))
                sys.stdout.flush()
                if step.text:
                    at_line_start = step.text.endswith("\n")
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # a no-op when Ctrl+C came inside the stream, which recorded the turn
            sys.stdout.write("" if at_line_start else "\n")
            if len(chat.turns) > n_turns:
                self.note(f"[interrupted after {len(chat.turns[-1].steps)} tokens; the partial answer stays in "
                          "the conversation]")
            else:
                self.note("[interrupted before the first token; the request is withdrawn]")
            return
        except (ValueError, BlendError) as e:
            self.note(f"error: {e}")
            return
        if not at_line_start:
            sys.stdout.write("\n")
        stats = chat.turns[-1].stats
        self.note(summary(stats))
        if stats["warning"]:
            sys.stdout.flush()
            print(self.paint(f"warning: {stats['warning']}", COLORS["blend"]), file=sys.stderr, flush=True)
        if stats["finish_reason"] == "context":
            self.note("(the context is full: older turns will be dropped before the next answer)")

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        chat = self.chat
        try:
            if name == "bye":
                return False
            elif name == "help":
                print(HELP.format(methods=", ".join(METHODS)))
            elif name == "stats":
                print(self.stats_text())
            elif name == "set":
                key, _, value = arg.partition(" ")
                if not value.strip():
                    raise ValueError("usage: /set NAME VALUE (/help lists the names)")
                chat.set(key, value.strip())
                print(f"{key} = {value.strip()}")
            elif name == "method":
                chat.blender.configure(method=arg)
                print(f"method = {arg}")
            elif name == "system":
                chat.system = arg or None
                print(f"system prompt {'set' if arg else 'removed'}; the models read the conversation again")
            elif name == "reset":
                chat.reset()
                print("new conversation")
            elif name == "save":
                if not arg:
                    raise ValueError("usage: /save FILE")
                chat.save(arg)
                print(f"saved {len(chat.turns)} turn(s) to {arg}")
            else:
                raise ValueError(f"unknown command /{name}; /help lists the commands")
        except (ValueError, TypeError, OSError) as e:
            self.note(f"error: {e}")
        return True

    def stats_text(self) -> str:
        chat = self.chat
        lines = []
        roles = list(chat.models())
        last = chat.session[-1] if chat.session else None
        if last is None:
            lines.append("no answer yet")
        elif last.interrupted:
            lines.append(f"last answer: interrupted after {len(last.steps)} tokens")
        else:
            s = last.stats
            lines.append(f"last answer: {s['tokens']} tokens in {s['generate_s']:.2f} s ({s['tokens_per_s']:.1f} "
                         f"tok/s) after a {s['prefill_s']:.2f} s prefill, ended by {s['finish_reason']}")
            lines.append(f"  interventions {s['interventions']} ({s['intervention_rate']:.0%}), mean alpha "
                         f"{s['mean_alpha']:.2f}, capped {s['capped']}")
            for r in roles:
                lines.append(f"  {r:5}: prompt {s['prompt_tokens'][r]} tokens, {s['reused_tokens'][r]} reused from "
                             f"the cache; {s['decoded_tokens'][r]} tokens decoded in {s['decode_calls'][r]} calls")
        done = [t.stats for t in chat.session if not t.interrupted]
        n_tokens = sum(len(t.steps) for t in chat.session)
        n_intervened = sum(s.intervened for t in chat.session for s in t.steps)
        seconds = sum(s["generate_s"] for s in done)
        lines.append(f"session: {len(chat.session)} answers ({len(chat.session) - len(done)} interrupted), "
                     f"{n_tokens} tokens, intervention rate {n_intervened / max(n_tokens, 1):.0%}, "
                     f"{sum(s['tokens'] for s in done) / seconds if seconds else 0:.1f} tok/s")
        for r in roles:
            lines.append(f"  {r:5}: {sum(s['decoded_tokens'][r] for s in done)} tokens decoded in "
                         f"{sum(s['decode_calls'][r] for s in done)} calls, "
                         f"{sum(s['reused_tokens'][r] for s in done)} reused")
        lines.append(f"conversation: {len(chat.turns) - chat.first} turns in context ({chat.first} dropped), "
                     f"context {chat.n_ctx()} tokens")
        lines.append("settings: " + ", ".join(f"{k} {v}" for k, v in chat.settings().items()
                                               if k not in ("stop", "system")))
        return "\n".join(lines)


def is_demo_pair(blender: Blender) -> bool:
    paths = [m.path for m in (blender.base, blender.guide) if m is not None]
    try:
        return [os.path.realpath(p) for p in paths] == [os.path.realpath(demo.demo_path(r)) for r in ("base", "guide")]
    except FileNotFoundError:  # no demo models installed
        return False


def default_system(blender: Blender) -> str | None:
    """The chat's system prompt for a pair: none for the demo pair (trained on questions alone)."""
    return None if is_demo_pair(blender) else CHAT_SYSTEM


def banner(blender: Blender) -> list[str]:
    """A few lines on what the models are: for the bundled demo pair, what it knows and questions
    to try (it knows nothing else: a greeting gets a made-up sum); otherwise the models' names."""
    if is_demo_pair(blender):
        tries = "  ".join(f'"{q}"' for q in demo.EXAMPLE_QUESTIONS)
        return ["The demo pair: tiny models trained on a made-up world of countries, with their capitals and flag "
                "colours, and on sums of two-digit numbers, one question at a time. They know nothing else (\"Hello!\" "
                "gets a made-up sum).",
                f"Try: {tries} (/reset between questions)"]
    lines = []
    for role, m in (("base", blender.base), ("guide", blender.guide)):
        if m is not None:
            known = real_models.model_of(m.path)
            name = known.description if known else m.metadata.get("general.name") or os.path.basename(m.path)
            lines.append(f"{role}: {name}")
    return lines


def cmd_chat(args) -> int:
    blender = blender_from_args(args, log=sys.stderr)
    for line in banner(blender):
        print(line, file=sys.stderr)
    system = default_system(blender) if args.system is None else args.system or None
    if system:
        print(f"system prompt: {system!r} (/system changes it)", file=sys.stderr)
    chat = Chat(blender, sampling_kwargs(args), system=system)
    color = not args.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return Terminal(chat, color=color, interactive=sys.stdin.isatty()).run()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="talk to a base + guide pair in the terminal (default: the demo pair)")
    add_model_args(p)
    add_blend_args(p, CHAT_DEFAULTS)
    p.add_argument("--system", help=f"the system prompt ('' for none; default: {CHAT_SYSTEM!r}, none on the demo pair)")
    p.add_argument("--no-color", action="store_true", help="do not colour tokens by source (also: NO_COLOR, "
                   "or output that is not a terminal)")
    p.set_defaults(func=cmd_chat)

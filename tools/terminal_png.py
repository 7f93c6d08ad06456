"""Render a terminal capture with colours (`tmux capture-pane -p -e`) as a PNG: how docs/chat.png
was made. Needs Pillow, which blendin_cpp does not depend on (pip install pillow).

    tmux new-session -d -s chat -x 118 -y 27
    tmux send-keys -t chat 'python -m blendin_cpp chat --threads 2' Enter   # then type the questions
    tmux capture-pane -t chat -p -e | sed "s|$PWD/||g" > chat.ansi         # paths as seen from the clone
    python -m tools.terminal_png chat.ansi docs/chat.png

Only what the chat writes is understood: SGR codes for the default, dim, yellow and green
foreground (everything else in an escape sequence is dropped).
"""
from __future__ import annotations

import argparse
import re
import sys

BACKGROUND = (30, 30, 30)
COLOURS = {39: (220, 220, 220), 33: (229, 192, 123), 32: (152, 195, 121)}  # default, yellow, green
DIM = (128, 128, 128)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
SGR = re.compile(r"\x1b\[([0-9;]*)m")
OTHER_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def runs(line: str, state: dict):
    """(text, rgb) pieces of one line; `state` carries the colour across lines, as a terminal does."""
    pos = 0
    for m in SGR.finditer(line):
        if m.start() > pos:
            yield OTHER_ESCAPE.sub("", line[pos:m.start()]), colour(state)
        for code in (int(c) for c in (m.group(1) or "0").split(";") if c):
            if code == 0:
                state.update(fg=39, dim=False)
            elif code == 2:
                state["dim"] = True
            elif code == 22:
                state["dim"] = False
            elif code in COLOURS:
                state["fg"] = code
        pos = m.end()
    yield OTHER_ESCAPE.sub("", line[pos:]), colour(state)


def colour(state: dict):
    return DIM if state["dim"] else COLOURS[state["fg"]]


def render(text: str, out: str, size: int = 15) -> None:
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(FONT, size)
    lines = text.rstrip("\n").split("\n")
    width = max(len(SGR.sub("", OTHER_ESCAPE.sub("", l))) for l in lines)
    cell_w = font.getlength("M")
    cell_h = int(size * 1.35)
    pad = 14
    img = Image.new("RGB", (int(cell_w * width) + 2 * pad, cell_h * len(lines) + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(img)
    state = {"fg": 39, "dim": False}
    for row, line in enumerate(lines):
        x = pad
        for piece, rgb in runs(line, state):
            draw.text((x, pad + row * cell_h), piece, font=font, fill=rgb)
            x += cell_w * len(piece)
    img.save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.terminal_png", description=__doc__.split("\n\n")[0])
    p.add_argument("capture", help="the output of tmux capture-pane -p -e")
    p.add_argument("png", help="the picture to write")
    args = p.parse_args(argv)
    with open(args.capture, encoding="utf-8") as f:
        render(f.read(), args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

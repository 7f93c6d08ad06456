"""The docs cannot go stale: every ```bash and ```python block of README.md and docs/*.md runs here.

- A block preceded immediately by a line `<!-- not run: REASON -->` is not run (downloads, real
  models, GPUs, other machines, servers that run until stopped, installs); the reason must be
  given.
- Bash blocks run with `bash -euo pipefail`, the installed package's interpreter first on PATH
  (`python` is this interpreter), in a scratch directory per page that links the repository's
  top-level files and folders (so `models/demo/dev.jsonl` resolves, and what a block writes stays
  in the scratch directory). Blocks of one page run in order and share that directory.
- Python blocks of one page run in order in one interpreter and share their variables, as a
  notebook does; the interpreter runs in a subprocess (a crash or hang fails the test, not the
  run), in the same scratch directory, and a failure's traceback names the page and its line.
- The option tables of docs/cli.md are compared with the command line's parsers
  (tools/docs_options.py prints the rows to add).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S) -->$")
FENCE = re.compile(r"^```([\w+-]*)\s*$")
TIMEOUT_S = 300  # a whole page's blocks; each block is meant to take seconds on the demo models
# what a scratch directory links from the repository (build outputs and environments stay out)
LEFT_OUT = {".git", ".venv", "build", ".pytest_cache"}


class Block:
    def __init__(self, page: Path, line: int, lang: str, source: str, skip_reason: str | None):
        self.page, self.line, self.lang, self.source, self.skip_reason = page, line, lang, source, skip_reason

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page (any language), each with the line its code starts on."""
    out, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: a code fence is never closed")
        marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
        out.append(Block(page, start + 2, m.group(1), "\n".join(lines[start + 1:i]) + "\n",
                         marker.group(1) if marker else None))
        i += 1
    return out


def runnable(page: Path, lang: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang == lang and b.skip_reason is None]


def scratch_dir(tmp_path: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name not in LEFT_OUT:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def run_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)  # the installed package, not the source tree
    return env


PYTHON_RUNNER = textwrap.dedent("""
    import sys, traceback
    namespace = {"__name__": "__main__"}
    for where, path, first_line, source in BLOCKS:
        code = compile("\\n" * (first_line - 1) + source, path, "exec")
        try:
            exec(code, namespace)
        except BaseException:
            print(f"\\nthe block at {where} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
""")


def pages_with(lang: str) -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES if runnable(p, lang)]


@pytest.mark.parametrize("page", pages_with("bash"))
def test_bash_blocks(page, tmp_path):
    cwd = scratch_dir(tmp_path)
    for block in runnable(page, "bash"):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block.source], cwd=cwd, env=run_env(),
                           capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (f"the block at {block.where} exited with status {r.returncode}:\n"
                                   f"{block.source}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


@pytest.mark.parametrize("page", pages_with("python"))
def test_python_blocks(page, tmp_path):
    cwd = scratch_dir(tmp_path)
    payload = [(b.where, str(b.page.relative_to(ROOT)), b.line, b.source) for b in runnable(page, "python")]
    script = f"BLOCKS = {payload!r}\n{PYTHON_RUNNER}"
    r = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=run_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"


def test_every_block_runs_or_says_why_not():
    """A fence says its language: a shell or Python block spelt another way (or a bare fence, which
    often holds commands) would silently escape this test. A not-run marker must stand right
    before a bash or python block."""
    unrun_spellings = {"", "sh", "shell", "zsh", "console", "shell-session", "py", "python3", "pycon"}
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for block in blocks(page):
            if block.lang in unrun_spellings:
                problems.append(f"{block.where}: a fence marked '{block.lang}': write bash or python (run here), "
                                "or text for output and synopses")
        for n, line in enumerate(lines):
            if line.strip().startswith("<!-- not run"):
                nxt = lines[n + 1] if n + 1 < len(lines) else ""
                if not NOT_RUN.match(line.strip()) or not re.match(r"^```(bash|python)\s*$", nxt):
                    problems.append(f"{page.relative_to(ROOT)}:{n + 1}: a not-run marker must read "
                                    "'<!-- not run: REASON -->' and stand right before a ```bash or ```python fence")
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))  # no headings in code
    return {slug(m) for m in re.findall(r"(?m)^#+ (.+)$", text)}


def test_docs_links_resolve():
    """Every relative link of the docs names a file of the repository, and a #fragment a heading
    of that page (the pages other issues add are listed in expected_elsewhere until they land)."""
    expected_elsewhere = {"docs/gpu.md"}
    problems = []
    for page in PAGES:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):
                continue
            path = (page.parent / target).resolve() if target else page
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if rel in expected_elsewhere:
                continue
            if not path.exists():
                problems.append(f"{page.relative_to(ROOT)}: link to {target}, which does not exist")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                problems.append(f"{page.relative_to(ROOT)}: link to {target}#{fragment}, a heading {rel} does not have")
    assert not problems, "\n".join(problems)


def test_cli_options_match_docs(monkeypatch):
    """docs/cli.md's option tables list exactly the parsers' options with their defaults."""
    monkeypatch.delenv("BLENDIN_API_KEY", raising=False)  # serve's --api-key default reads it
    sys.path.insert(0, str(ROOT))
    try:
        from tools import docs_options
    finally:
        sys.path.remove(str(ROOT))
    diffs = docs_options.differences((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    assert not diffs, ("docs/cli.md and the command line's parsers differ "
                       "(python -m tools.docs_options prints every table):\n" + "\n".join(diffs))


def test_ci_runs_the_readme_install_commands_as_written():
    """The README's two install blocks (quick start; install and test) are not run here, since
    each compiles llama.cpp: .ci/run runs them, and holds each of their lines in order."""
    readme = ROOT / "README.md"
    installs = [b for b in blocks(readme) if b.skip_reason and "install" in b.skip_reason]
    assert len(installs) == 2, f"expected the quick start and the test command, found {[b.where for b in installs]}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for block in installs:
        at = 0
        for line in block.source.splitlines():
            try:
                at = ci.index(line, at) + 1
            except ValueError:
                raise AssertionError(f".ci/run lacks this line of the block at {block.where} (in order):\n{line}") from None


def test_chat_commands_match_docs():
    """docs/cli.md's table of chat commands lists the commands the chat's /help lists, and its
    /set row every setting the chat accepts."""
    from blendin_cpp import chat
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    rows = re.findall(r"(?m)^\| `(/\w+)[^`]*` \|(.*)\|$", doc)
    assert {name for name, _ in rows} == set(re.findall(r"(?m)^  (/\w+)", chat.HELP)), \
        "the chat commands in docs/cli.md differ from those of chat.HELP"
    set_row = next(what for name, what in rows if name == "/set")
    named = set(re.findall(r"`(\w+)`", set_row))
    settings = {*chat.BLEND_SETTINGS, *chat.SAMPLING}
    assert settings <= named, f"docs/cli.md's /set row lacks {sorted(settings - named)}"
    assert named - settings <= {"auto", "none"}, f"docs/cli.md's /set row names {sorted(named - settings - {'auto', 'none'})}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; the front page keeps to 200 (the rest belongs in docs/)"

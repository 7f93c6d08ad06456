"""The option tables of docs/cli.md, read from the command line's own argparse parsers.

    python -m tools.docs_options            # every table, as docs/cli.md should hold it
    python -m tools.docs_options --check    # what docs/cli.md lacks or has too many (exit 1 if anything)

docs/cli.md has one `### NAME` section per subcommand (`### generate`, `### av extract`, ...) and
one per group of options that several subcommands share (`### Model options`, `### Blending
options`, `### Sampling options`, made by blendin_cpp.options). A section's table rows are
`| --flag VALUE | default | what it does |`: the first two columns are compared with the parsers
(tests/test_docs.py), the third is the docs' own words (this script drafts it from the --help
text). A subcommand's section names the shared groups it takes on an `Also takes:` line.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CLI_DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

# the shared groups' sections, by the group titles blendin_cpp.options gives them
SHARED = {"models": "Model options", "blending": "Blending options", "sampling": "Sampling options",
          "repetition controls": "Repetition options"}


def shared_groups() -> dict[str, tuple[str, dict]]:
    """{argparse group title: (section heading, {option key: default text})} of the groups
    blendin_cpp.options adds, with their own defaults (a subcommand may change one)."""
    from blendin_cpp.options import add_blend_args, add_model_args
    scratch = argparse.ArgumentParser()
    add_model_args(scratch)
    add_blend_args(scratch)
    out = {}
    for group in scratch._action_groups:
        key = group.title.split(" (")[0]  # "models (default: the bundled demo pair)" -> "models"
        if key in SHARED:
            out[group.title] = (SHARED[key], {key_of(a): default_text(a) for a in group._group_actions})
    return out


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """(command path, parser) of every subcommand that runs something (`av extract`, not `av`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_parsers(sub, path + (name,))


def default_text(action: argparse.Action) -> str:
    """How a table's default column spells the action's default."""
    if not action.option_strings:
        return "required" if action.nargs in (None, "+") else ""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None or action.default == []:
        return ""
    return str(action.default)


def flag_text(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    value = action.metavar or (action.dest.upper().rstrip("_") if not action.choices
                               else "{" + ",".join(map(str, action.choices)) + "}")
    if action.nargs == "?":
        value = f"[{value}]"
    return ", ".join(action.option_strings) + f" {value}"


def row(action: argparse.Action, default: str) -> str:
    help_text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{flag_text(action)}` | {'`' + default + '`' if default else ''} | {help_text} |"


def expected() -> dict:
    """{section heading: {"rows": {option key: (action, default text)}, "takes": set of shared headings}}.
    An option of a shared group whose default a subcommand changes is a row of that subcommand too."""
    from blendin_cpp.cli import build_parser
    shared = shared_groups()
    sections: dict = {}
    for path, parser in leaf_parsers(build_parser()):
        own = sections.setdefault(" ".join(path), {"rows": {}, "takes": set()})
        for group in parser._action_groups:
            for action in group._group_actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                key, default = key_of(action), default_text(action)
                if group.title in shared:
                    heading, defaults = shared[group.title]
                    own["takes"].add(heading)
                    sections.setdefault(heading, {"rows": {}, "takes": set()})["rows"][key] = (action, defaults[key])
                    if default == defaults[key]:
                        continue
                own["rows"][key] = (action, default)
    return sections


def key_of(action: argparse.Action) -> str:
    return ", ".join(action.option_strings) if action.option_strings else (action.metavar or action.dest.upper())


def documented(text: str) -> dict:
    """{section heading: {"rows": {option key: default text}, "takes": set of shared headings}} from
    the markdown of docs/cli.md (only `### ` sections; a row's key is the option strings in its
    first cell, or its first cell's text for a positional argument)."""
    sections: dict = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:].strip().strip("`"), {"rows": {}, "takes": set()})
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("Also takes:"):
            current["takes"] |= {SHARED[k] for k in SHARED if f"{SHARED[k].lower()}]" in line.lower()}
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            words = [part.split(" ")[0] for part in cells[0].strip("`").split(", ")]
            flags = [w for w in words if w.startswith("-")]
            key = ", ".join(flags) if flags else words[0]
            current["rows"][key] = cells[1].strip("`") if len(cells) > 1 else ""
    return sections


def differences(text: str) -> list[str]:
    """What docs/cli.md says differently from the parsers, one line each (empty: they agree)."""
    want, have = expected(), documented(text)
    out = []
    for heading, sec in want.items():
        doc = have.get(heading)
        if doc is None:
            out.append(f"missing section '### {heading}' with these rows:")
            out += ["  " + row(a, d) for a, d in sec["rows"].values()]
            continue
        for key, (action, default) in sec["rows"].items():
            if key not in doc["rows"]:
                out.append(f"### {heading}: missing row  {row(action, default)}")
            elif doc["rows"][key] != default:
                out.append(f"### {heading}: {key} has default '{doc['rows'][key]}' in the docs, '{default}' in the parser")
        for key in doc["rows"]:
            if key not in sec["rows"]:
                out.append(f"### {heading}: row '{key}' documents an option the parser does not have")
        if heading not in SHARED.values() and doc["takes"] != sec["takes"]:
            names = ", ".join(f"[{h.lower()}](#{h.lower().replace(' ', '-')})" for h in SHARED.values()
                              if h in sec["takes"])
            out.append(f"### {heading}: the 'Also takes:' line should name exactly: {names or 'nothing (drop the line)'}")
    for heading in have:
        if heading not in want:
            out.append(f"section '### {heading}' names no subcommand or shared group")
    return out


def tables() -> str:
    out = []
    for heading, sec in expected().items():
        out.append(f"### {heading}\n")
        if sec["takes"]:
            out.append("Also takes: " + ", ".join(f"[{h.lower()}](#{h.lower().replace(' ', '-')})"
                                                  for h in SHARED.values() if h in sec["takes"]) + ".\n")
        if sec["rows"]:
            out.append("| option | default | what it does |\n|---|---|---|")
            out += [row(a, d) for a, d in sec["rows"].values()]
        elif not sec["takes"]:
            out.append("No options.")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.docs_options", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare docs/cli.md with the parsers instead")
    args = p.parse_args(argv)
    if not args.check:
        print(tables())
        return 0
    diffs = differences(CLI_DOC.read_text(encoding="utf-8"))
    print("\n".join(diffs) if diffs else "docs/cli.md agrees with the parsers")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

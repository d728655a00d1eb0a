"""Write docs/reference/cli.md from the Typer app itself: every command's help text (with its
examples) and every option (flags, type, default, help). tests/test_docs.py regenerates it
and compares, so the reference cannot drift from `ditc --help`.

    python scripts/gen_cli_reference.py            # writes docs/reference/cli.md
    python scripts/gen_cli_reference.py --check    # exit 1 when the file is not current
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from dit_compress.cli import app

OUT = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _help(cmd) -> str:
    """The command's help as written (its docstring): paragraphs kept, example lines as a code block."""
    text = inspect.cleandoc(cmd.help or "")
    out, block = [], []
    for para in text.split("\n\n"):
        lines = para.strip().splitlines()
        if lines and all(line.strip().startswith(("ditc ", "accelerate ", "python ")) for line in lines):
            block += [line.strip() for line in lines]
            continue
        if block:
            out.append("```bash\n" + "\n".join(block) + "\n```")
            block = []
        out.append(" ".join(line.strip() for line in lines))
    if block:
        out.append("```bash\n" + "\n".join(block) + "\n```")
    return "\n\n".join(p for p in out if p)


def _param_row(p: click.Parameter) -> str:
    flag = bool(getattr(p, "is_flag", False))
    kind = p.display_type(None).strip("<>")
    if p.param_type_name == "argument":
        names = f"`{p.name.upper()}`"
        kind = f"argument ({kind})"
    else:
        names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        kind = "flag" if flag else kind
    default = p.default if not callable(p.default) else None
    shown = "" if default in (None, "", ()) or (flag and default is False) else f"`{default}`"
    req = " (required)" if p.required else ""
    return f"| {names} | {kind}{req} | {shown} | {_cell(getattr(p, 'help', '') or '')} |"


def render() -> str:
    group = typer.main.get_command(app)
    ctx = None
    parts = ["# Command reference", "",
             "Generated from the `ditc` command-line app by `scripts/gen_cli_reference.py` (a test checks that it is "
             "current); `ditc COMMAND --help` prints the same.", ""]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        parts += [f"## `ditc {name}`", "", _help(cmd), "", "| option | type | default | help |", "|---|---|---|---|"]
        parts += [_param_row(p) for p in cmd.params if not getattr(p, "hidden", False)]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is not current: run python scripts/gen_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

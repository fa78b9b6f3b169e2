"""The README's command-line examples on the built-in model run as written.

Every `signround quantize smollm2-135m ...` command in a ```sh or ```bash block of README.md that is cheap
to run (round-to-nearest, or tiny tuning settings) is run in-process, in a temporary folder, followed by the
README's `signround generate` / `eval` / `export` commands on its output. Each must exit 0, and each output
must load with `signround.load`. A README example that stops working fails `make test` here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import signround
from signround.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BUILTIN = "smollm2-135m"
TINY = {"--iters": 2, "--nsamples": 4, "--seqlen": 64}  # at most these, all three given: "tiny settings"
FOLLOW_UPS = ("generate", "eval", "export")


def shell_commands(markdown: str) -> list[list[str]]:
    """The commands of the ```sh / ```bash blocks, as argument lists: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```(?:sh|bash)[ \t]*\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args:
                commands.append(args)
    return commands


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def formats(args: list[str]) -> list[str]:
    if "--format" not in args:
        return ["signround"]
    values = []
    for arg in args[args.index("--format") + 1:]:
        if arg.startswith("-"):
            break
        values.append(arg)
    return values


def cheap(args: list[str]) -> bool:
    if option(args, "--method") == "rtn":
        return True
    values = {name: option(args, name) for name in TINY}
    return all(v is not None and int(v) <= TINY[name] for name, v in values.items())


def runnable_chains(markdown: str) -> list[list[list[str]]]:
    """Each cheap quantize command on the built-in model, with the README's later commands on its output."""
    commands = shell_commands(markdown)
    chains = []
    for i, args in enumerate(commands):
        if args[:3] != ["signround", "quantize", BUILTIN] or not cheap(args):
            continue
        output = option(args, "-o", "--output")
        follow = [later for later in commands[i + 1:]
                  if later[:1] == ["signround"] and len(later) > 2 and later[1] in FOLLOW_UPS and later[2] == output]
        chains.append([args, *follow])
    return chains


CHAINS = runnable_chains(README.read_text())


def test_the_readme_shows_a_runnable_quantize_and_its_use():
    assert CHAINS, f"README.md has no ```sh/```bash `signround quantize {BUILTIN} --method rtn ...` (or tiny settings) command"
    assert any(len(chain) > 1 and any(c[1] in ("generate", "eval") for c in chain[1:]) for chain in CHAINS), \
        "README.md runs no `signround generate` or `signround eval` on the output of a runnable quantize command"


# 60-85 s on 2 busy cores (loading SmolLM2 from its GGUF, quantizing 30 blocks, generating 40 tokens): worth it in the default run
@pytest.mark.parametrize("chain", CHAINS, ids=[shlex.join(c[0][1:]) for c in CHAINS])
def test_readme_commands_run(chain, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative output paths land in tmp_path
    quantize, *rest = chain
    output = option(quantize, "-o", "--output")
    assert output and not Path(output).is_absolute(), f"README command writes outside the working folder: {shlex.join(quantize)}"
    for args in chain:
        code = main(args[1:])
        captured = capsys.readouterr()
        assert code == 0, f"`{shlex.join(args)}` exited {code}:\n{captured.err[-3000:]}"
        if args is quantize:
            written = formats(quantize)
            if written == ["signround"]:
                assert signround.load(tmp_path / output) is not None
            elif "signround" in written:
                assert signround.load(tmp_path / output / "signround") is not None
            else:
                assert (tmp_path / output).is_dir()
        elif args[1] == "generate":
            prompt = args[3] if len(args) > 3 else ""
            assert captured.out.strip() and prompt in captured.out, captured.out


ROOT = README.parent
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250, "README.md is for users: run-by-run notes go to docs/ or benchmarks/results/README.md"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # links inside code blocks are not links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to nothing: {broken}"


@pytest.mark.parametrize("args", [c for c in shell_commands(README.read_text()) if c[0] == "signround"], ids=shlex.join)
def test_every_readme_command_parses(args):
    """The commands that are not run (hub ids, your own folders) still name only options that exist."""
    from signround.cli import build_parser

    build_parser().parse_args(args[1:])

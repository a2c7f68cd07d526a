"""The docs say only what the program accepts.

Every `migm ...` / `python -m migm ...` command line quoted in README.md, docs/*.md and
experiments/archive/README.md (in ``` blocks and in inline `code`, lines ending in `\\` joined)
is parsed by the CLI's own parser with `--print_config`, so a flag, a config file or a value a
doc quotes that the program does not accept fails here, naming the doc and the line (command
lines with placeholders, <...>, ..., FILE, DIR, $VAR, are skipped; `make` lines name no migm command).
A flag quoted on its own (`--metrics.fid inception`) must be accepted by some command. The docs
also use no tracker words, repeat no heading, and every relative link (file and #anchor) resolves.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from migm import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [d for d in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
                    REPO / "experiments" / "archive" / "README.md") if d.is_file()]

FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")           # a span may wrap, never over a blank line
COMMAND = re.compile(r"(?:^|[\s(=])(?:(?:python3?\s+)?-m\s+)?migm\s+(.*)$")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…|\b(?:FILE|DIR)\b|\$\{?\w")   # a shell variable too


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _fenced(text: str):
    """(line number, command text) of each line of a ``` block, continuations joined."""
    for block in FENCE.finditer(text):
        start = _line_of(text, block.start(1))
        lines = block.group(1).split("\n")
        i = 0
        while i < len(lines):
            first, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            yield start + first, line
            i += 1


def _inline(text: str):
    """(line number, code) of each inline `code` span outside ``` blocks."""
    blanked = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(blanked):
        yield _line_of(blanked, span.start()), " ".join(span.group(1).split())


def doc_commands(docs: list[Path] | None = None, root: Path = REPO) -> list[tuple[str, list[str]]]:
    """(id "doc:line: command", argv) of every migm command line the docs quote."""
    found = []
    for doc in DOCS if docs is None else docs:
        text = doc.read_text()
        for line_no, code in [*_fenced(text), *_inline(text)]:
            match = COMMAND.search(code)
            if not match or PLACEHOLDER.search(code):
                continue
            try:
                argv = shlex.split(match.group(1), comments=True)
            except ValueError:                       # an unbalanced quote: not a command line
                continue
            if not argv or (argv[0] not in cli.VERBS and argv[0] not in ("-h", "--help")):
                continue                             # prose ("migm loads ..."), not a command
            name = f"{doc.relative_to(root)}:{line_no}: migm {' '.join(argv)}"
            found.append((name, argv))
    return found


def without_ckpt_path(argv: list[str]) -> list[str]:
    """--ckpt_path names a file a run writes (it is read, checked, at parse time): drop it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(arg)
    return out


def resolves(argv: list[str]) -> None:
    """Parse `argv` with the CLI's parser and print the resolved config; fail unless it exits 0."""
    if any(a in ("-h", "--help") for a in argv):
        args = argv
    else:
        args = [*without_ckpt_path(argv), "--print_config"]
    try:
        cli.main(args)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"`migm {' '.join(argv)}` exits {exit_.code}"
        return
    if argv[0] not in ("-h", "--help"):
        pytest.fail(f"`migm {' '.join(argv)}` did not stop at --print_config")


COMMANDS = doc_commands()


@pytest.fixture
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")         # cli.default_wandb_mode would set it for good


def test_the_docs_quote_commands():
    assert len(COMMANDS) >= 20, [name for name, _ in COMMANDS]
    docs = {name.split(":")[0] for name, _ in COMMANDS}
    assert {"README.md", "docs/results.md", "docs/archive.md"} <= docs, docs


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[name for name, _ in COMMANDS])
def test_a_quoted_command_resolves(argv, at_repo, capsys):
    resolves(argv)


@pytest.mark.parametrize("argv", [
    ["test", "--config", "configs/tiny.yaml", "--model.init_args.test_weights", "shortcut.pt"],
    ["evaluate", "--features", "inception"],
    ["fit", "--config", "experiments/archive/levers/kl.yaml"],          # an override alone
    ["test", "--config", "configs/no_such.yaml"],
])
def test_a_stale_command_fails(argv, at_repo, capsys):
    """The check has teeth: a flag that moved, an override given alone, a missing file."""
    with pytest.raises((AssertionError, pytest.fail.Exception, ValueError, FileNotFoundError)):
        resolves(argv)


def test_the_extractor_reads_wrapped_and_continued_lines(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("Run `python -m\nmigm test --config a.yaml` or\n\n```bash\n"
                   "python -m migm fit --config b.yaml \\\n    --trainer.devices 2   # note\n"
                   "make demo\nmigm export FILE\n```\nand `migm` itself; migm loads it.\n")
    found = doc_commands([doc], root=tmp_path)
    assert found == [("d.md:5: migm fit --config b.yaml --trainer.devices 2",
                      ["fit", "--config", "b.yaml", "--trainer.devices", "2"]),
                     ("d.md:1: migm test --config a.yaml", ["test", "--config", "a.yaml"])]


# a flag quoted on its own (`--metrics.fid inception`): it must exist for some command
GENERIC = {"--config", "--print_config", "--help", "--ckpt_path"}
UNKNOWN = ("unrecognized arguments", "is not accepted", "No action for key")


def doc_flags(docs: list[Path] | None = None, root: Path = REPO) -> list[tuple[str, list[str]]]:
    """(id, args) of every inline `--flag [value] ...` span the docs quote outside a command
    line; placeholder values (FILE, DIR, NAME) become "x"."""
    found = []
    for doc in DOCS if docs is None else docs:
        for line_no, code in _inline(doc.read_text()):
            if not code.startswith("--") or code in GENERIC or COMMAND.search(code):
                continue
            args = [re.sub(r"^(?:FILE|DIR|NAME)$", "x", a) for a in shlex.split(code)]
            found.append((f"{doc.relative_to(root)}:{line_no}: {code}", args))
    return found


def flag_exists(args: list[str]) -> bool:
    """True when some command accepts these flags; a placeholder value may fail to parse, an
    unknown flag may not."""
    for verb in ("test", "fit", "collect", "evaluate", "speed"):
        try:
            cli.main([verb, *args, "--print_config"], raise_errors=True)
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return True
        except Exception as err:                  # noqa: BLE001 - jsonargparse's or a module's
            if not any(u in str(err) for u in UNKNOWN):
                return True
    return False


FLAGS = doc_flags()


@pytest.mark.parametrize("args", [args for _, args in FLAGS], ids=[name for name, _ in FLAGS])
def test_a_quoted_flag_exists(args, at_repo, capsys):
    assert flag_exists(args), f"no command accepts {' '.join(args)}"


@pytest.mark.parametrize("args", [["--model.init_args.clip_path", "x"], ["--features", "inception"],
                                  ["--model.init_args.evaluation.latency_repeats", "2"]])
def test_a_moved_flag_is_unknown(args, at_repo, capsys):
    assert not flag_exists(args)


TRACKER = re.compile(r"(?<![-\w])(?:issues?|stops?|rounds?)\s+\d+|\bthis round\b|\bthe issue's\b|\bissue \d+'s\b", re.I)


def test_tracker_words_are_told_from_command_flags():
    assert TRACKER.search("as planned in round 3") and TRACKER.search("see issue 24")
    assert not TRACKER.search("migm speed --rounds 1 --warmup 0")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_no_tracker_words(doc):
    """The docs speak of the product, not of the tracker that planned it."""
    hits = [f"{doc.relative_to(REPO)}:{_line_of(doc.read_text(), m.start())}: {m.group(0)}"
            for m in TRACKER.finditer(doc.read_text())]
    assert not hits, hits


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_links_resolve(doc):
    """Every relative link names a file that exists and, with #anchor, a heading it has."""
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, broken


def test_no_heading_twice():
    """A doc's headings are distinct (a repeated heading is a leftover of a merge)."""
    for doc in DOCS:
        headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", doc.read_text()), re.M)
        repeated = {h for h in headings if headings.count(h) > 1}
        assert not repeated, (doc.name, repeated)

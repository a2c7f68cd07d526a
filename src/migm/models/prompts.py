"""Prompt files: the text each condition id of a text-to-image base stands for.

Condition j is line j of the file (blank lines do not count), so collection, fit-time evaluation
and `test` index one table and the number of conditions follows from the file. Two formats:

- plain text (any suffix but .jsonl): one prompt per line, surrounding whitespace stripped;
- JSONL (.jsonl): one JSON object per line with a string "prompt" and an optional "id" (a string
  or an integer, unique in the file; default: the prompt's 0-based position), the way benchmark
  prompt sets are distributed with their own identifiers.

A missing or empty file, a file that is not UTF-8 text (binary, UTF-16: a leading UTF-8 byte
order mark is allowed), a NUL character in a line, or a line that is not such an object, is a
PromptFileError naming the file (and the line, 1-based, as an editor shows it). A NUL would
otherwise reach the text encoder as part of a prompt, and a decode error named neither file nor
fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file is missing, empty or malformed (the message names the file and line)."""


@dataclass(frozen=True)
class PromptTable:
    """`prompts[j]` is the text of condition j; `ids[j]` its identifier (output names, reports)."""

    prompts: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompt_file(path: str | Path) -> PromptTable:
    """Read a plain-text or JSONL prompt file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} not found: give a text file with one prompt per "
                              "line, or a .jsonl file of {\"prompt\": ..., \"id\": ...} objects")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PromptFileError(f"prompt file {path} is UTF-16 text (it starts with a UTF-16 byte order "
                              "mark): it must be UTF-8 text; re-save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text (byte {err.start} cannot be decoded; "
                              "a binary file?): it must be UTF-8 text, one prompt per line") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise PromptFileError(f"{path}:{number}: holds a NUL character (a binary or UTF-16 file?): "
                                  "prompts must be UTF-8 text")
    table = _read_jsonl(path, lines) if path.suffix.lower() == ".jsonl" else _read_text(lines)
    if not table.prompts:
        raise PromptFileError(f"prompt file {path} holds no prompt (only blank lines): "
                              "give at least one")
    return table


def _read_text(lines: list[str]) -> PromptTable:
    prompts = [line.strip() for line in lines if line.strip()]
    return PromptTable(prompts, [str(j) for j in range(len(prompts))])


def _read_jsonl(path: Path, lines: list[str]) -> PromptTable:
    prompts, ids, where = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PromptFileError(f"{path}:{number}: expected an object with a non-empty string "
                                  "\"prompt\" (and an optional \"id\")")
        if "\x00" in row["prompt"]:
            raise PromptFileError(f"{path}:{number}: the prompt holds a NUL character (\\u0000)")
        ident = row.get("id", len(prompts))
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise PromptFileError(f"{path}:{number}: \"id\" must be a string or an integer, "
                                  f"got {ident!r}")
        ident = str(ident)
        if ident in where:
            raise PromptFileError(f"{path}:{number}: id {ident!r} already used on line {where[ident]}")
        where[ident] = number
        prompts.append(row["prompt"].strip())
        ids.append(ident)
    return PromptTable(prompts, ids)

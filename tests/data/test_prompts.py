import json

import pytest

from migm.data.prompts import PromptFileError, read_prompt_file


def test_plain_text_skips_blank_lines_and_strips():
    path = "prompts.txt"
    table = _write(path, "a red cat\n\n   \n  a big blue dog on the grass \r\nlast line without newline")
    assert table.prompts == ["a red cat", "a big blue dog on the grass", "last line without newline"]
    assert table.ids == ["0", "1", "2"] and len(table) == 3


def test_jsonl_reads_prompts_and_ids_defaulting_to_the_position():
    rows = [{"prompt": "a red cat", "id": "cat-01"}, {"prompt": " a dog ", "id": 7},
            {"prompt": "a bird", "category": "animals"}]
    table = _write("p.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert table.prompts == ["a red cat", "a dog", "a bird"]
    assert table.ids == ["cat-01", "7", "2"]              # the third has no id: its position


@pytest.mark.parametrize("body, match", [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p\.jsonl:2: not valid JSON"),
    ('{"prompt": "ok"}\n\n["a list"]\n', r"p\.jsonl:3: expected an object with a non-empty string"),
    ('{"text": "no prompt key"}\n', r"p\.jsonl:1: expected an object"),
    ('{"prompt": "   "}\n', r"p\.jsonl:1: expected an object"),
    ('{"prompt": "a", "id": [1]}\n', r"p\.jsonl:1: \"id\" must be a string or an integer"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', r"p\.jsonl:2: id 'x' already used on line 1"),
])
def test_bad_jsonl_lines_are_named_by_file_and_line(body, match):
    with pytest.raises(PromptFileError, match=match):
        _write("p.jsonl", body)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(PromptFileError, match=r"prompt file .*nope\.txt not found"):
        read_prompt_file(tmp_path / "nope.txt")
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(PromptFileError, match=rf"{name} holds no prompt"):
            read_prompt_file(tmp_path / name)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _write(name, text):
    from pathlib import Path
    Path(name).write_text(text)
    return read_prompt_file(name)

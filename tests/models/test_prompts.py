import json

import pytest

from migm.models.prompts import PromptFileError, read_prompt_file


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



@pytest.mark.parametrize("data, match", [
    ("a red cat\na dog\n".encode("utf-16"), r"prompt file p\.txt is UTF-16 text .*must be UTF-8 text"),
    (bytes(range(256)) * 4, r"prompt file p\.txt is not UTF-8 text \(byte 128 .*must be UTF-8 text"),
    ("a red cat\n".encode("utf-16-le"), r"p\.txt:1: holds a NUL character .*must be UTF-8 text"),
    (b"a red cat\na d\x00og\n", r"p\.txt:2: holds a NUL character"),
])
def test_a_file_that_is_not_utf8_text_is_named_with_what_it_must_be(data, match):
    from pathlib import Path
    Path("p.txt").write_bytes(data)
    with pytest.raises(PromptFileError, match=match):
        read_prompt_file("p.txt")


def test_a_nul_escaped_in_jsonl_is_refused_and_a_utf8_bom_is_not_part_of_the_prompt():
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: the prompt holds a NUL character"):
        _write("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a d\\u0000og"}\n')
    from pathlib import Path
    Path("bom.txt").write_bytes("\ufeffa red cat\n".encode("utf-8"))
    assert read_prompt_file("bom.txt").prompts == ["a red cat"]

@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _write(name, text):
    from pathlib import Path
    Path(name).write_text(text)
    return read_prompt_file(name)

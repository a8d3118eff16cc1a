"""A JSON-lines --prompts-file whose line the parser cannot take for reasons beyond a syntax error (nesting too deep
for its recursion, a number too long to convert): the line is named by file and number, in one line, status 2."""

import json
import os
import subprocess
import sys

import pytest

from gpt2_model import GPT2
from speculative_gpt2 import cli, prompts_file
from speculative_gpt2.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = '{"prompt": "Hello"}'
DEEP_ARRAY = "[" * 100_000
LONG_INTEGER = '{"prompt": "x", "n": ' + "1" * 4400 + "}"


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer()


def prompts(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, message", [
    (DEEP_ARRAY, "nested too deeply to read"),
    ('{"prompt": ' + "[" * 100_000, "nested too deeply to read"),
    ('{"prompt": "x", "more": ' + '{"a": ' * 100_000, "nested too deeply to read"),
    (LONG_INTEGER, "a number with more than 4300 digits"),
    ('{"prompt": "x", "n": -' + "9" * 5000 + "}", "a number with more than 4300 digits"),
])
def test_a_line_the_parser_cannot_take_is_named(tmp_path, enc, line, message):
    path = prompts(tmp_path, GOOD, line, GOOD)
    with pytest.raises(ValueError) as error:
        prompts_file.read_prompts(str(path), enc)
    text = str(error.value)
    assert text.startswith(f"--prompts-file {path}, line 2: ") and message in text and "\n" not in text
    assert "set_int_max_str_digits" not in text  # a Python setting the user cannot pass


@pytest.mark.parametrize("line, message", [(DEEP_ARRAY, "line 2: nested too deeply to read"),
                                           (LONG_INTEGER, "line 2: a number with more than 4300 digits")])
def test_the_command_line_names_file_and_line_and_exits_2(tmp_path, capsys, monkeypatch, line, message):
    monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    path = prompts(tmp_path, GOOD, line)
    status = cli.main(["--prompts-file", str(path), "--target", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and f"--prompts-file {path}, {message}" in err, err


def test_no_traceback_from_the_installed_command(tmp_path):
    # A separate interpreter: the recursion limit and the stack are those a user's run has.
    path = prompts(tmp_path, GOOD, DEEP_ARRAY)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), "--prompts-file", str(path),
                             "--target", str(tmp_path), "--device", "cpu"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--prompts-file {path}, line 2: nested too deeply to read" in result.stderr


def test_what_the_parser_takes_is_still_read(tmp_path, enc):
    # Nesting well within the limit, a number of 4300 digits, an overflowing float: all JSON Python reads.
    path = prompts(tmp_path, '{"prompt": "a", "deep": ' + "[" * 50 + "]" * 50 + "}",
                   '{"prompt": "b", "n": ' + "1" * 4300 + "}", '{"prompt": "c", "x": 1e999999}')
    assert [p.text for p in prompts_file.read_prompts(str(path), enc)] == ["a", "b", "c"]


def test_after_a_too_deep_line_the_interpreter_goes_on(tmp_path, enc):
    with pytest.raises(ValueError):
        prompts_file.read_prompts(str(prompts(tmp_path, '{"a": ' * 100_000)), enc)
    assert [p.text for p in prompts_file.read_prompts(str(prompts(tmp_path, GOOD)), enc)] == ["Hello"]


def test_syntax_errors_keep_their_reason_and_column(tmp_path, enc):
    # The parser's own errors keep their message: the character where it stopped.
    with pytest.raises(ValueError, match=r"line 1: invalid JSON \(Expecting ',' delimiter, column 16\)"):
        prompts_file.read_prompts(str(prompts(tmp_path, '{"prompt": "a" "b"}')), enc)


@pytest.mark.parametrize("key, flag", [("temperature", "--temperature"), ("max_new_tokens", "--max-new-tokens"),
                                       ("top-p", "--top-p"), ("lookahead", "--lookahead")])
def test_a_line_that_sets_an_option_of_the_run_is_refused_with_the_flag(tmp_path, enc, key, flag):
    path = prompts(tmp_path, GOOD, json.dumps({"prompt": "Hello there", key: 0.9}))
    with pytest.raises(ValueError) as error:
        prompts_file.read_prompts(str(path), enc)
    assert str(error.value) == (f'--prompts-file {path}, line 2: "{key}" is an option of the whole run, not of one '
                                f'prompt: give it on the command line ({flag}) and remove it from the line')


def test_other_fields_of_a_line_are_still_ignored(tmp_path, enc):
    path = prompts(tmp_path, json.dumps({"prompt": "Hello", "id": "a-17", "source": {"url": "x"}, "target": "Hi"}))
    assert [p.text for p in prompts_file.read_prompts(str(path), enc)] == ["Hello"]


def test_every_flag_a_refusal_names_is_the_command_lines(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert all(f"{flag} " in help_text or f"{flag}\n" in help_text for flag in prompts_file.RUN_OPTIONS.values())


def test_a_json_looking_line_in_a_plain_text_file_is_a_prompt_and_noted(tmp_path, enc):
    path = prompts(tmp_path, "Hello there", '{"prompt": "x"}', "More", ' {"prompt": "y", "seed": 1}')
    read = prompts_file.read_prompts(str(path), enc)
    assert [p.text for p in read] == ["Hello there", '{"prompt": "x"}', "More", ' {"prompt": "y", "seed": 1}']
    assert prompts_file.json_looking_note(str(path), read) == (
        f"note: --prompts-file {path} is plain text, as its first line decides: line 2 (and 1 more), which looks "
        f"like a JSON line, is a prompt as written; for JSON lines, make every line one")
    plain = prompts(tmp_path, "Hello there", "{braces} in text")  # no "prompt" key: nothing to note
    assert prompts_file.json_looking_note(str(plain), prompts_file.read_prompts(str(plain), enc)) is None
    json_file = prompts(tmp_path, GOOD, GOOD)
    assert prompts_file.json_looking_note(str(json_file), prompts_file.read_prompts(str(json_file), enc)) is None

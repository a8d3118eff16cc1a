"""Folders named by the environment: $SPECULATIVE_GPT2_WEIGHTS, $XDG_CACHE_HOME, $HF_HOME, $HF_HUB_CACHE and HOME.
A `~user` that cannot be expanded, or no home folder, is one line naming what to set, never a traceback, and
--help always shows; a relative XDG_CACHE_HOME is ignored, as the XDG specification says."""

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_model import GPT2
from speculative_gpt2 import checkpoints, cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_USER = "~nosuchuserhere"  # a user name no system has (no hyphen: --help wraps lines there)
VARIABLES = ("SPECULATIVE_GPT2_WEIGHTS", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE")


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """A clean environment with HOME in tmp_path, and an installed package's view (no checkout's weights/)."""
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(checkpoints, "__file__", str(tmp_path / "site-packages" / "speculative_gpt2" / "x.py"))
    return tmp_path / "home"


def no_home(monkeypatch):
    # No HOME, and no entry in the password database: nothing says where home is.
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))


def one_line_error(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


# The named cases --------------------------------------------------------------------------------------------------


def test_weights_variable_with_an_unknown_user(environment, monkeypatch):
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", f"{NO_USER}/x")
    message = one_line_error(checkpoints.default_weights_dir)
    assert message.startswith(f"SPECULATIVE_GPT2_WEIGHTS='{NO_USER}/x': user 'nosuchuserhere' has no home folder")
    assert "set SPECULATIVE_GPT2_WEIGHTS to an absolute path" in message


def test_xdg_cache_home_with_an_unknown_user(environment, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", NO_USER)
    for call in (checkpoints.default_weights_dir, checkpoints.hf_cache_dir):
        assert one_line_error(call).startswith(f"XDG_CACHE_HOME='{NO_USER}': user")


@pytest.mark.parametrize("variable", VARIABLES)
def test_help_shows_whatever_the_environment(environment, monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, NO_USER)
    with pytest.raises(SystemExit) as exit:
        cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0 and "--weights-dir" in out
    if variable in ("SPECULATIVE_GPT2_WEIGHTS", "XDG_CACHE_HOME"):  # the two that decide the weights folder
        assert f"(default: none, {variable}='{NO_USER}'" in out


def test_help_from_the_command_without_a_traceback(tmp_path):
    env = os.environ | {"SPECULATIVE_GPT2_WEIGHTS": f"{NO_USER}/x", "XDG_CACHE_HOME": NO_USER}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "speculative.py"), "--help"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "--weights-dir" in result.stdout


def test_relative_xdg_cache_home_is_ignored(environment, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "rel/cache")
    assert checkpoints.default_weights_dir() == environment / ".cache" / "speculative-gpt2"
    assert checkpoints.hf_cache_dir() == environment / ".cache" / "huggingface" / "hub"


def test_no_home_is_one_line_naming_what_to_set(environment, monkeypatch):
    no_home(monkeypatch)
    message = one_line_error(checkpoints.default_weights_dir)
    assert "cannot find your home folder" in message and "set HOME" in message
    assert "SPECULATIVE_GPT2_WEIGHTS" in message
    assert "HF_HUB_CACHE" in one_line_error(checkpoints.hf_cache_dir)


# Beyond them ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_hugging_face_variables_with_an_unknown_user(environment, monkeypatch, variable):
    monkeypatch.setenv(variable, f"{NO_USER}/hf")
    assert one_line_error(checkpoints.hf_cache_dir).startswith(f"{variable}='{NO_USER}/hf': user")


def test_tilde_without_a_home_names_home(environment, monkeypatch):
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", "~/weights")
    no_home(monkeypatch)
    message = one_line_error(checkpoints.default_weights_dir)
    assert "HOME is unset" in message and "or set HOME" in message


def test_a_relative_home_is_no_home(environment, monkeypatch):
    monkeypatch.setenv("HOME", "relative/home")
    assert "cannot find your home folder" in one_line_error(checkpoints.default_weights_dir)


def test_what_the_environment_names_is_used(environment, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checkpoints.default_weights_dir() == tmp_path / "xdg" / "speculative-gpt2"
    assert checkpoints.hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"  # huggingface_hub's default too
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert checkpoints.default_weights_dir() == environment / "xdg" / "speculative-gpt2"
    monkeypatch.setenv("HF_HOME", "~/hf")
    assert checkpoints.hf_cache_dir() == environment / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert checkpoints.hf_cache_dir() == tmp_path / "hub"
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", "~/w")
    assert checkpoints.default_weights_dir() == environment / "w"
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", "relative/w")  # the user's own choice, like --weights-dir
    assert checkpoints.default_weights_dir() == Path("relative/w")


def test_the_cache_is_where_huggingface_hub_looks(environment, monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    for extra in ({}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {"HF_HOME": str(tmp_path / "hf")},
                  {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}):
        env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | extra
        theirs = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                                capture_output=True, text=True, env=env, timeout=60, check=True).stdout.strip()
        for variable in VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        for variable, value in extra.items():
            monkeypatch.setenv(variable, value)
        assert checkpoints.hf_cache_dir() == Path(theirs), extra


def test_a_run_that_needs_the_folder_names_the_variable(environment, monkeypatch, capsys):
    monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", f"{NO_USER}/x")
    status = cli.main(["--target", "gpt2", "--mode", "plain", "--no-download", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--target gpt2: SPECULATIVE_GPT2_WEIGHTS='{NO_USER}/x'" in err


def test_weights_dir_on_the_command_line_needs_no_default(environment, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(GPT2, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setenv("SPECULATIVE_GPT2_WEIGHTS", f"{NO_USER}/x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    status = cli.main(["--target", "gpt2", "--mode", "plain", "--no-download", "--device", "cpu", "--weights-dir",
                       str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert status == 2 and "downloading is off" in err and "SPECULATIVE_GPT2_WEIGHTS" not in err

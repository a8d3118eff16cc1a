"""The package as a user installs it: a wheel, built from this checkout, installed (not editable) into a scratch
virtual environment, runs from another directory, offline, with its tokenizer files and the console command."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel and a virtual environment are built: seconds apiece

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd, env=None, timeout=300):
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the scratch environment's bin folder, a clean environment for subprocesses)."""
    tmp = tmp_path_factory.mktemp("install")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp / "dist",
        ROOT, cwd=tmp)
    wheel = next((tmp / "dist").glob("speculative_gpt2-*.whl"))
    run(sys.executable, "-m", "venv", tmp / "venv", cwd=tmp)
    bin_dir = tmp / "venv" / "bin"
    # torch and the other dependencies come from this environment (no second 200 MB download): its site-packages
    # joins the scratch one as a plain path, so neither its .pth files nor an editable install of this checkout
    # come along. The wheel itself is installed for real, without its dependencies.
    site = run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp)
    Path(site.stdout.strip(), "deps.pth").write_text(
        "\n".join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})) + "\n")
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPECULATIVE_GPT2_WEIGHTS", "VIRTUAL_ENV")}
    env |= {"HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp / "home" / ".cache"),
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    return wheel, bin_dir, env, tmp


def test_the_wheel_holds_two_modules_one_package_and_the_tokenizer_files(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"speculative.py", "gpt2_model.py", "speculative_gpt2"}  # nothing generic in site-packages
    for name in ("encoder.json", "vocab.bpe", "SHA256SUMS"):
        assert f"speculative_gpt2/tokenizer_files/{name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "speculative-gpt2 = speculative_gpt2.command:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_command_runs_offline_from_another_folder(installed):
    _, bin_dir, env, tmp = installed
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    where = run(bin_dir / "python", "-c", "import speculative, speculative_gpt2.checkpoints as c; "
                "print(speculative.__file__); print(c.default_weights_dir())", cwd=elsewhere, env=env)
    module, weights = where.stdout.split()
    assert Path(module).is_relative_to(tmp / "venv") and not Path(module).is_relative_to(ROOT)
    assert Path(weights) == tmp / "home" / ".cache" / "speculative-gpt2"  # user-writable, not site-packages
    help_text = run(bin_dir / "speculative-gpt2", "--help", cwd=elsewhere, env=env).stdout
    assert help_text.startswith("usage: speculative-gpt2") and "--lookahead" in help_text
    for name, folder in (("gpt2-xl", "target"), ("gpt2", "draft")):  # the README's offline route, small
        run(bin_dir / "python", "-m", "speculative_gpt2.random_checkpoint", name, folder, "--n-layer", "1",
            cwd=elsewhere, env=env)
    result = run(bin_dir / "speculative-gpt2", "--target", "target", "--draft", "draft", "--max-new-tokens", "6",
                 "--ignore-eos", "--threads", "1", cwd=elsewhere, env=env)
    assert "identical outputs: yes" in result.stdout and "Traceback" not in result.stderr
    assert "Failed to initialize NumPy" not in result.stderr


def test_a_failed_checkpoint_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    from speculative_gpt2.random_checkpoint import tiny_pair

    def no_numpy(*args, **kwargs):  # what safetensors' writer raised in an environment without numpy
        raise ModuleNotFoundError("No module named 'numpy'")

    monkeypatch.setattr(safetensors.torch, "save_file", no_numpy)
    target, _ = tiny_pair()
    with pytest.raises(ModuleNotFoundError):
        target.save_pretrained(tmp_path / "new" / "model")
    assert not (tmp_path / "new" / "model").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ModuleNotFoundError):  # a folder the user had keeps what it held
        target.save_pretrained(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]

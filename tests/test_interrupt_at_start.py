"""Ctrl-C while the command starts (torch takes seconds to import): status 130, one line, no traceback, from the
console command's entry point and from `python speculative.py` alike."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from speculative_gpt2 import cli, command

ROOT = Path(__file__).resolve().parent.parent

# A child whose `import torch` announces itself, then takes 60 s: the signal is sent while it imports, not after a
# guessed delay. `run` says how the command is started.
SLOW_TORCH = textwrap.dedent("""
    import sys, time

    class SlowTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                print("importing torch", flush=True)
                time.sleep(60)
            return None

    sys.meta_path.insert(0, SlowTorch())
    sys.argv = [{argv0!r}, "--max-new-tokens", "4"]
    {run}
""")
ENTRY_POINT = "from speculative_gpt2.command import main; sys.exit(main())"  # what the console script does
SCRIPT = "import runpy; runpy.run_path('speculative.py', run_name='__main__')"  # python speculative.py


def default_sigint():
    # The default disposition of SIGINT, whatever this process inherited: a shell that ignores it passes that on,
    # and Python then raises no KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(args, *, when) -> subprocess.CompletedProcess:
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    try:
        when(process)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def announced(process):
    assert process.stdout.readline() == "importing torch\n"


@pytest.mark.parametrize("argv0, run, name", [("speculative-gpt2", ENTRY_POINT, "speculative-gpt2"),
                                              ("speculative.py", SCRIPT, "speculative.py")])
def test_ctrl_c_during_the_torch_import(argv0, run, name):
    result = interrupted([sys.executable, "-c", SLOW_TORCH.format(argv0=argv0, run=run)], when=announced)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and result.stderr == f"\n{name}: interrupted\n"


def test_ctrl_c_soon_after_the_real_command_starts():
    # No patched import: the real script, interrupted while it loads. torch's C extension, while it initializes,
    # can swallow a SIGINT (torch/__init__.py's `from torch._C import *`: the import then goes on), so Ctrl-C is
    # pressed again every 0.3 s, as a user would, until the command says it was interrupted.
    process = subprocess.Popen([sys.executable, str(ROOT / "speculative.py"), "--max-new-tokens", "4"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        time.sleep(0.2)
        deadline = time.monotonic() + 60
        while process.poll() is None and not any("interrupted" in line for line in stderr):
            assert time.monotonic() < deadline, "".join(stderr)
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(10)
    text = "".join(stderr)
    assert process.returncode == 130, text
    assert "Traceback" not in text and "speculative.py: interrupted" in text


def test_the_entry_point_passes_the_command_lines_status_on(monkeypatch, capsys):
    monkeypatch.setattr(cli, "main", lambda argv=None: 7)
    assert command.main([]) == 7
    monkeypatch.setattr(cli, "main", lambda argv=None: (_ for _ in ()).throw(KeyboardInterrupt))
    assert command.main([]) == 130
    assert capsys.readouterr().err.endswith(": interrupted\n")


def test_the_entry_point_imports_nothing_heavy():
    # Whatever it imports before its guard could be interrupted unguarded.
    loaded = subprocess.run([sys.executable, "-c", "import sys, speculative_gpt2.command; print(sorted(sys.modules))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "torch" not in loaded and "speculative_gpt2.cli" not in loaded


def test_the_console_script_is_the_guarded_entry_point():
    assert '\nspeculative-gpt2 = "speculative_gpt2.command:main"\n' in (ROOT / "pyproject.toml").read_text()

"""The `speculative-gpt2` command and `python speculative.py`: the command line (speculative_gpt2/cli.py) behind a
guard that imports nothing heavy.

Loading torch takes seconds; a Ctrl-C then arrives while Python imports the command line, before the command line's
own handling of Ctrl-C exists. Here it ends the command as one anywhere else does: status 130, one line, no traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns its exit status (130 when interrupted, also while it starts)."""
    try:
        from speculative_gpt2.cli import main as command_line

        return command_line(argv)
    except KeyboardInterrupt:
        name = "speculative.py" if sys.argv and sys.argv[0].endswith("speculative.py") else "speculative-gpt2"
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lrpipe``: the ``lrpipe`` command.

The command lives in ``flows.cli`` (it runs Prefect flows); the library knows nothing of
Prefect, so it is imported here only when the command runs, never when lrpipe is imported.
"""

from __future__ import annotations


def main() -> int:
    from flows.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a training script with ``optim="sngm"`` registered.

Usage:

    python -m hf_trainer SCRIPT [ARGS...]
    python -m hf_trainer -m MODULE [ARGS...]
    accelerate launch -m hf_trainer SCRIPT [ARGS...]

The script runs as ``__main__`` with ``sys.argv = [SCRIPT, *ARGS]`` and its directory first
on ``sys.path``, as ``python SCRIPT ARGS`` would run it, so an unmodified Hugging Face
example (``run_glue.py``, ``run_clm.py``, ...) accepts ``--optim sngm``. Its exit status
(``sys.exit(n)`` or an exception) becomes this command's.
"""

from __future__ import annotations

import os
import runpy
import sys

import hf_trainer  # noqa: F401  (importing registers optim="sngm")

USAGE = "usage: python -m hf_trainer SCRIPT [ARGS...]  |  python -m hf_trainer -m MODULE [ARGS...]"


def main(argv: list[str]) -> None:
    """Run ``argv[0]`` (a script path, or ``-m MODULE``) as ``__main__``, SNGM registered.

    Args:
        argv: The command line after ``python -m hf_trainer``.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").strip(), file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"{USAGE}\nerror: -m needs a module name")
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    if not os.path.isfile(script):
        raise SystemExit(f"{USAGE}\nerror: SCRIPT={script!r} is not a file")
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

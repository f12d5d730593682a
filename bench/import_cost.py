"""Cold-start import cost: async_notifier.metrics against aws-lambda-powertools' Metrics.

    .venv/bin/python -m bench.import_cost [--runs 25] [--powertools-python PATH]

Without --powertools-python it makes a throw-away venv with the same interpreter and
installs aws-lambda-powertools there (the project never depends on it). Each statement is
timed with time.perf_counter in a fresh interpreter, `--runs` times, twice: in an empty
interpreter, and after the imports a cold start of the worker does anyway (`handler`, which
brings the whole package, and aioboto3), which is what a Lambda cold start would pay on
top. Bytecode is compiled by a warm-up run first, as in a deployment package built with pip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POWERTOOLS = "aws-lambda-powertools==3.37.0"
# What a Lambda init imports: `handler` (and through it the package), aioboto3 and the
# client config `aws/clients.py` loads. tests/test_docs.py runs it, so a module that moves
# cannot break the documented command again.
WORKER_IMPORTS = "import handler, aioboto3, aiobotocore.config; "
STATEMENTS = (
    "import async_notifier.metrics",
    "from aws_lambda_powertools.metrics import Metrics",
)


def measure(python: str, statement: str, prelude: str, env: dict[str, str]) -> tuple[float, int]:
    """Milliseconds the statement took, and how many modules it added."""
    code = (
        f"{prelude}import sys, time; before = set(sys.modules); t = time.perf_counter(); "
        f"{statement}; t = time.perf_counter() - t; "
        "print(t * 1000, len(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    ).stdout.split()
    return float(out[0]), int(out[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--powertools-python", help="a python that can import powertools")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        python = args.powertools_python
        if python is None:
            venv = Path(scratch) / "venv"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            python = str(venv / "bin" / "python")
            subprocess.run([python, "-m", "pip", "install", "-q", POWERTOOLS], check=True)
        site = subprocess.run(
            [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPATH"] = os.pathsep.join((str(ROOT), site))
        # The minimum is the figure to compare (others' load only ever adds); the median
        # shows the spread on a busy machine.
        print(f"{args.runs} fresh interpreters per line")
        for label, prelude in (
            ("empty interpreter", ""),
            ("after the worker's imports", WORKER_IMPORTS),
        ):
            print(f"== {label}")
            for statement in STATEMENTS:
                measure(python, statement, prelude, env)  # warm-up: writes the bytecode
                runs = [measure(python, statement, prelude, env) for _ in range(args.runs)]
                times = [ms for ms, _ in runs]
                print(
                    f"  {statement:50s} min {min(times):6.2f} ms, median "
                    f"{statistics.median(times):6.2f} ms  +{runs[0][1]} modules"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

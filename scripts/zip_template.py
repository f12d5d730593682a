#!/usr/bin/env python3
"""Write dist/template.yaml: template.yaml with the functions' code at `make package`'s zip.

template.yaml's functions take their code from the checkout (`CodeUri: .` in Globals), which
`sam build` builds; `aws cloudformation package`, or `sam deploy` without `sam build`, would
upload the checkout as it is. This copy names dist/deployment-package.zip instead, beside it,
so `make package` gives a template that deploys exactly the zip it built:

    aws cloudformation package --template-file dist/template.yaml --s3-bucket BUCKET ...
    sam deploy --template-file dist/template.yaml ...

Usage: python scripts/zip_template.py [--template template.yaml] [--output dist/template.yaml]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZIP_NAME = "deployment-package.zip"
# The one code location, in Globals.Function.
_CODE_URI = re.compile(r"^(Globals:\n  Function:\n(?:    .*\n)*?    CodeUri: )\.$", re.MULTILINE)


def zip_template(text: str, zip_name: str = ZIP_NAME) -> str:
    """`text` with Globals' `CodeUri: .` replaced by `zip_name`; ValueError without one."""
    replaced, count = _CODE_URI.subn(lambda match: match[1] + zip_name, text)
    if count != 1:
        raise ValueError("template.yaml has no `CodeUri: .` under Globals.Function")
    return replaced


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "template.yaml")
    args = parser.parse_args(argv)
    try:
        text = zip_template(args.template.read_text())
    except ValueError as exc:
        print(f"zip_template: error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"template: {args.output} (CodeUri: {ZIP_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

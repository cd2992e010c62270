"""Generate Python code for every proto under protos/ into libs/ (package `freshet`).

With ``--check`` the code is generated into a temporary directory and compared with the
committed files; any difference fails, so generated code never drifts from the protos.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Runs protoc on every proto file and returns the generated files (relative to ``out``)."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = []
    for proto in protos:
        rel = proto.relative_to(PROTO_ROOT).parent
        for path in (out / rel).iterdir():
            if path.name.endswith(SUFFIXES):
                generated.append(path.relative_to(out))
        # Packages need __init__.py so setuptools finds them.
        for parent in [rel, *rel.parents]:
            if str(parent) in (".", "freshet"):
                continue
            init = out / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
                generated.append(init.relative_to(out))
    return sorted(set(generated))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code differs")
    args = parser.parse_args()
    if not args.check:
        files = generate(OUT_ROOT)
        print(f"generated {len(files)} files under {OUT_ROOT.relative_to(ROOT)}/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        drift = [
            str(f)
            for f in files
            if not (OUT_ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, OUT_ROOT / f, shallow=False)
        ]
    if drift:
        print("generated code is out of date; run `make protos`:", *drift, sep="\n  ", file=sys.stderr)
        return 1
    print(f"generated code matches protos ({len(files)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

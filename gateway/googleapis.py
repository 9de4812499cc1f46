"""Stage `google/api/{annotations,http}.proto` for buf.

The gateway's JSON transcoding needs `google.api.http` annotations in the
contracts, so buf must see those imports. They are copied from the installed
`googleapis-common-protos` (the same pinned package whose `_pb2` modules the
generated code imports at run time) into a git-ignored folder that buf.yaml
lists as a second, never-linted module: one source, no vendored copy to drift.

    python -m agentplex.gateway.googleapis .build/googleapis
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api

FILES = ("annotations.proto", "http.proto")


def stage(target: Path) -> list[Path]:
    source = Path(next(iter(google.api.__path__)))
    destination = target / "google" / "api"
    destination.mkdir(parents=True, exist_ok=True)
    staged = []
    for name in FILES:
        shutil.copyfile(source / name, destination / name)
        staged.append(destination / name)
    return staged


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m agentplex.gateway.googleapis TARGET_DIR")
    stage(Path(args[0]))


if __name__ == "__main__":
    main()

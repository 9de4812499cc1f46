"""The google/api and google/rpc protos the contracts build on, vendored for buf.

`google/api/{annotations,http}.proto` carry the `google.api.http` annotations of
the gateway's JSON transcoding; `google/rpc/{status,error_details}.proto` are the
error the services send (`google.rpc.Status` with an `ErrorInfo`). They live,
unchanged and with their license, under `proto/third_party/googleapis`, a buf
module that is never linted, so `buf generate`, `buf lint` and `buf build` work
from a fresh clone without running Python first.

The pinned `googleapis-common-protos` (whose `_pb2` modules the generated code
imports at run time) stays the one source: tests/proto checks that the copies
are byte-identical to the installed package's, and when the pin moves

    python -m agentplex.gateway.googleapis proto/third_party/googleapis

(`make googleapis`) refreshes them; `--check` only reports the differences.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from pathlib import Path

import google.api
import google.rpc

DISTRIBUTION = "googleapis-common-protos"
# Where the copies live, relative to the repository root (buf.yaml names it too).
VENDORED_DIR = Path("proto/third_party/googleapis")
FILES = (
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
)
LICENSE = "LICENSE"
_PACKAGES = {"google/api": google.api, "google/rpc": google.rpc}


def source(name: str) -> Path:
    """The installed package's copy of `name` (one of FILES, or LICENSE)."""
    if name == LICENSE:
        for file in importlib.metadata.distribution(DISTRIBUTION).files or ():
            if file.name == LICENSE:
                return Path(str(file.locate()))
        raise FileNotFoundError(f"{DISTRIBUTION} ships no {LICENSE} file")
    folder, _, filename = name.rpartition("/")
    return Path(next(iter(_PACKAGES[folder].__path__))) / filename


def stage(target: Path) -> list[Path]:
    """Copy FILES (under their import paths) and the license from the installed package."""
    staged = []
    for name in (*FILES, LICENSE):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source(name), destination)
        staged.append(destination)
    return staged


def differences(target: Path) -> list[str]:
    """The files under `target` that are missing or differ from the installed package's."""
    return [
        name
        for name in (*FILES, LICENSE)
        if not (target / name).is_file()
        or (target / name).read_bytes() != source(name).read_bytes()
    ]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    targets = [arg for arg in args if arg != "--check"]
    if len(targets) != 1:
        raise SystemExit("usage: python -m agentplex.gateway.googleapis [--check] TARGET_DIR")
    target = Path(targets[0])
    if check:
        stale = differences(target)
        if stale:
            raise SystemExit(
                f"{target}: {', '.join(stale)} differ from the installed {DISTRIBUTION}: "
                "run `make googleapis`"
            )
        return
    stage(target)


if __name__ == "__main__":
    main()

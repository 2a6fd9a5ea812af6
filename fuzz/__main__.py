"""``python -m fuzz {list,run,replay,seeds,campaign}``: see :mod:`fuzz`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fuzz.targets import SPECS, TARGETS, run_one

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"
WORK = Path(os.environ.get("PYNYDUS_FUZZ_WORK", "/var/tmp/pyn-fuzz"))

#: The campaign's limits (docs/fuzzing.md): per input 1 s, per process 256 MB RSS.
TIMEOUT_S = 1
RSS_LIMIT_MB = 256


def _instrumented() -> None:
    """Import what the targets use with atheris's coverage instrumentation."""
    import atheris

    with atheris.instrument_imports(include=["pynydus", "tomllib"]):
        import tomllib  # noqa: F401

        import pynydus.config
        import pynydus.convert.image
        import pynydus.daemon.config
        import pynydus.grpcwire.connection
        import pynydus.grpcwire.hpackin
        import pynydus.rafs.format.blobmeta
        import pynydus.rafs.read
        import pynydus.rafs.source  # noqa: F401


def cmd_run(name: str, libfuzzer_args: list[str]) -> int:
    import atheris

    spec = TARGETS[name]
    _instrumented()

    def one(data: bytes) -> None:
        run_one(spec, data)

    atheris.Setup([f"fuzz-{name}", *libfuzzer_args], one)
    atheris.Fuzz()
    return 0


def cmd_replay(name: str, paths: list[str]) -> int:
    spec = TARGETS[name]
    for p in paths:
        files = sorted(Path(p).iterdir()) if Path(p).is_dir() else [Path(p)]
        for f in files:
            t0 = time.perf_counter()
            run_one(spec, f.read_bytes())
            print(f"{name} {f}: ok in {time.perf_counter() - t0:.3f}s")
    return 0


_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


def fuzz_target(name: str, *, runs: int, max_time: int | None, out: Path,
                extra: Sequence[str] = (), fixtures: bool = False) -> dict[str, object]:
    """Run one target in a child process (nice 10); its figures and findings."""
    spec = TARGETS[name]
    work = out / name
    corpus = work / "corpus"  # new units go here, not into the repo's seeds
    corpus.mkdir(parents=True, exist_ok=True)
    from fuzz.seeds import FIXTURE_SEEDS

    for fixture in FIXTURE_SEEDS.get(name, []) if fixtures else []:
        if fixture.is_file():  # too big for the repo's seeds: joins the work corpus
            shutil.copyfile(fixture, corpus / f"fixture-{fixture.parent.parent.name}")
    seeds = CORPUS / name
    regressions = REGRESSIONS / name  # past findings: every run starts from them too
    args = [f"-runs={runs}", f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-max_len={spec.max_len}", f"-artifact_prefix={work}/", "-print_final_stats=1",
            *( [f"-max_total_time={max_time}"] if max_time else []), *extra,
            str(corpus), *(str(d) for d in (seeds, regressions) if d.is_dir())]
    log = work / "fuzz.log"
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.run(
            ["nice", "-n", "10", sys.executable, "-m", "fuzz", "run", name, "--", *args],
            stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent, check=False,
        )
    elapsed = time.monotonic() - t0
    text = log.read_text(errors="replace")
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    artifacts = sorted(str(p) for p in work.iterdir()
                       if p.name.startswith(("crash-", "timeout-", "oom-", "leak-", "slow-unit-")))
    return {
        "target": name,
        "executions": stats.get("number_of_executed_units", 0),
        "exec_per_s": stats.get("average_exec_per_sec", 0),
        "peak_rss_mb": stats.get("peak_rss_mb", 0),
        "new_units": stats.get("new_units_added", 0),
        "seconds": round(elapsed, 1),
        "exit_code": proc.returncode,
        "findings": artifacts,
        "log": str(log),
    }


def cmd_campaign(names: list[str], runs: int, max_time: int | None, out: Path,
                 fixtures: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    results: list[dict[str, object]] = []
    if summary_path.exists():
        results = [r for r in json.loads(summary_path.read_text()) if r["target"] not in names]
    failed = 0
    for name in names:
        res = fuzz_target(name, runs=runs, max_time=max_time, out=out, fixtures=fixtures)
        results.append(res)
        summary_path.write_text(json.dumps(results, indent=2))
        bad = res["exit_code"] != 0 or res["findings"]
        failed += bool(bad)
        print(f"{name:18} {res['executions']:>9} runs {res['seconds']:>8}s "
              f"{res['exec_per_s']:>6}/s rss {res['peak_rss_mb']:>4} MB "
              f"{'FINDINGS ' + ' '.join(map(str, res['findings'])) if bad else 'clean'}",
              flush=True)
    return 1 if failed else 0


def cmd_seeds() -> int:
    from fuzz.seeds import write_seeds

    write_seeds(CORPUS)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m fuzz")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run", help="fuzz one target in this process (libFuzzer flags after --)")
    r.add_argument("target", choices=sorted(TARGETS))
    rp = sub.add_parser("replay", help="run a target on files or directories, no atheris")
    rp.add_argument("target", choices=sorted(TARGETS))
    rp.add_argument("paths", nargs="+")
    sub.add_parser("seeds", help="write fuzz/corpus again from the fixtures")
    c = sub.add_parser("campaign", help="every target (or those named), one at a time")
    c.add_argument("targets", nargs="*", default=[], help="default: all")
    c.add_argument("--runs", type=int, default=1_000_000)
    c.add_argument("--max-time", type=int, default=None, help="seconds per target")
    c.add_argument("--fixtures", action="store_true",
                   help="add the big fixture bootstraps to the work corpus (60 runs/s, not 2,000)")
    c.add_argument("--out", type=Path, default=WORK / time.strftime("campaign-%Y%m%d-%H%M"))
    args = p.parse_args(argv)
    if args.cmd == "list":
        for s in SPECS:
            print(f"{s.name:18} {s.doc}")
        return 0
    if args.cmd == "run":
        return cmd_run(args.target, extra)
    if args.cmd == "replay":
        return cmd_replay(args.target, args.paths)
    if args.cmd == "seeds":
        return cmd_seeds()
    names = args.targets or [s.name for s in SPECS]
    if unknown := sorted(set(names) - set(TARGETS)):
        p.error(f"unknown targets: {', '.join(unknown)} (python -m fuzz list)")
    return cmd_campaign(names, args.runs, args.max_time, args.out, args.fixtures)


if __name__ == "__main__":
    sys.exit(main())

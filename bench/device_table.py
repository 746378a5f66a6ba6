"""One Markdown table of every figure bench/device_check.sh measured.

bench/device_check.sh runs each step under its own timeout, keeps its output in `OUTDIR/logs/<step>.log`
and appends `step <TAB> exit status <TAB> limit s <TAB> seconds <TAB> command` to `OUTDIR/steps.tsv`.
This reads them back: every `RESULT <metric>=<value>` line of a step's log is a row, a pytest summary
(`13 passed in 12.1s`) is a row, and a step that failed or ran past its limit is a row with the reason
(the last error line of its log), so a broken step shows in the table instead of vanishing from it.

    python bench/device_table.py OUTDIR [--dry-run]     # writes OUTDIR/device_check.md and prints it
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RESULT = re.compile(r"^RESULT ([A-Za-z0-9_.\-]+)=(\S+)\s*$")
PYTEST = re.compile(r"^=*\s*((?:\d+ (?:passed|failed|skipped|errors?|xfailed|xpassed|warnings?|deselected)(?:, )?)+) in [\d.]+s")
TIMED_OUT = (124, 137)  # timeout(1): the limit was reached; 137 after --kill-after's SIGKILL


@dataclass
class Step:
    name: str
    rc: int
    limit_s: float
    seconds: float
    command: str


def read_steps(path: Path) -> list[Step]:
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, rc, limit, seconds, command = line.split("\t", 4)
        steps.append(Step(name, int(rc), float(limit), float(seconds), command))
    return steps


def figures(log: str) -> list[tuple[str, str]]:
    """(metric, value) from the RESULT lines and pytest summaries of a log, in order."""
    rows = []
    for line in log.splitlines():
        line = line.strip()
        if m := RESULT.match(line):
            rows.append((m.group(1), m.group(2)))
        elif m := PYTEST.match(line):
            rows.append(("tests", m.group(1)))
    return rows


def reason(log: str) -> str:
    """The line that says why a step failed: the last one naming an error, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.search(r"error|Error|FAIL|Traceback|Killed|out of memory", line):
            return line
    return lines[-1] if lines else "(no output)"


def cell(text: str, limit: int = 200) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status(step: Step) -> str:
    if step.rc == 0:
        return "ok"
    if step.rc < 0:
        return "skipped (no time left)"
    if step.rc in TIMED_OUT:
        return f"timed out after {step.limit_s:.0f} s"
    return f"failed (exit {step.rc})"


def describe_machine() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return "no NVIDIA GPU visible (nvidia-smi absent or failing)"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_table(outdir: Path, dry_run: bool) -> str:
    steps = read_steps(outdir / "steps.tsv")
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Device check, {when}", "",
             f"Commit {commit()}; machine: {describe_machine()}.", ""]
    if dry_run:
        lines += ["**Dry run: every step on the CPU at tiny sizes. These are not GPU figures.**", ""]
    lines += ["| step | status | s | metric | value |", "|---|---|---|---|---|"]
    for step in steps:
        log_path = outdir / "logs" / f"{step.name}.log"
        log = log_path.read_text(encoding="utf-8", errors="replace") if log_path.is_file() else ""
        rows = figures(log)
        state = status(step)
        if step.rc != 0:
            rows.append(("error", reason(log)))
        if not rows:
            rows = [("(no figures)", "")]
        for metric, value in rows:
            lines.append(f"| {step.name} | {state} | {step.seconds:.0f} | {cell(metric)} | {cell(value)} |")
    failed = [s.name for s in steps if s.rc != 0]
    lines += ["", f"{len(steps) - len(failed)} of {len(steps)} steps ok" + (f"; failed: {', '.join(failed)}." if failed else "."),
              "Commands:", ""]
    lines += [f"- `{s.name}`: `{s.command}` (limit {s.limit_s:.0f} s)" for s in steps]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="the folder bench/device_check.sh wrote (steps.tsv, logs/)")
    parser.add_argument("--dry-run", action="store_true", help="mark the table as a CPU dry run")
    args = parser.parse_args(argv)
    if not (args.outdir / "steps.tsv").is_file():
        print(f"error: {args.outdir / 'steps.tsv'} not found (written by bench/device_check.sh)", file=sys.stderr)
        return 2
    table = build_table(args.outdir, args.dry_run)
    (args.outdir / "device_check.md").write_text(table, encoding="utf-8")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

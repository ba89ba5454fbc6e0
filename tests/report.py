"""Write RELIABILITY.md from what the reliability tests recorded (see scripts/reliability).

Usage: python -m tests.report RESULTS_DIR OUTPUT.md
"""

from __future__ import annotations

import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def outcomes(junit: Path) -> dict[str, str]:
    """Test name -> passed / failed / skipped, from pytest's JUnit XML."""
    found: dict[str, str] = {}
    if not junit.exists():
        return found
    for case in ET.parse(junit).iter("testcase"):
        name = case.get("name", "")
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "FAILED"
        elif case.find("skipped") is not None:
            state = "skipped"
        found[f"{case.get('classname', '')}::{name}"] = state
    return found


def main(folder: str, output: str) -> int:
    results = Path(folder)
    lines = (
        (results / "results.jsonl").read_text().splitlines()
        if (results / "results.jsonl").exists()
        else []
    )
    entries = [json.loads(line) for line in lines]
    states: dict[str, str] = {}
    for junit in sorted(results.glob("junit*.xml")):  # the host tier's, the VM's
        states.update(outcomes(junit))
    failed = [name for name, state in states.items() if state != "passed"]
    full = all(e["full"] for e in entries) if entries else False
    out = [
        "# Reliability",
        "",
        "Written by `scripts/reliability` (full counts; `--reduced` gives CI's) from the "
        "figures the tests themselves recorded in that run; edit nothing here by hand.",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M %Z')}, host {platform.system()} {platform.release()} "
        "(tier vm: the kernel its rows name), "
        f"Python {platform.python_version()}, counts: {'full' if full else 'reduced'}; "
        f"{len(states)} tests, {len(states) - len(failed)} passed"
        + (f", not passed: {', '.join(failed)}" if failed else "")
        + ".",
        "",
        "| Test | Tier | What it did | What it checked | Result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in entries:  # a test records only once its checks have passed
        cells = [e["test"], e["tier"], e["did"], e["checked"], "passed"]
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    Path(output).write_text("\n".join(out) + "\n")
    print(f"wrote {output}: {len(entries)} rows, {len(failed)} test(s) not passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

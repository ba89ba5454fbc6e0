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
from typing import Any


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


def attack_table(attacks: list[dict[str, Any]]) -> list[str]:
    """The adversarial suite's rows: an attacker uid against a victim uid, each row
    recorded with its verdict (a failed attack too)."""
    out = [
        "",
        "## Attacks",
        "",
        "An attacker uid tries to exhaust one shared resource while a victim uid keeps "
        "working (tests/host/test_adversarial.py, tests/kernel/test_adversarial.py). Each "
        "asserts: every victim request succeeded; the victim's p99 under attack within "
        "10x its own baseline p99 (measured just before, same run) + 20 ms; the daemon's "
        "fds back to baseline and its VmRSS within 16 MiB of it once the attacker left; "
        "and the attack's own effect. Victim p50/p99 in ms: baseline -> under attack.",
        "",
        "| Attack | Tier | Config | Counts | Victim p50/p99 vs baseline | Figures | Result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in attacks:
        shown = ", ".join(f"{k}: {v}" for k, v in e["figures"].items())
        cells = [e["attack"], e["tier"], e["config"], e["counts"], e["victim"], shown, e["result"]]
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return out


def main(folder: str, output: str) -> int:
    results = Path(folder)
    lines = (
        (results / "results.jsonl").read_text().splitlines()
        if (results / "results.jsonl").exists()
        else []
    )
    everything = [json.loads(line) for line in lines]
    entries = [e for e in everything if "attack" not in e]
    attacks = [e for e in everything if "attack" in e]
    states: dict[str, str] = {}
    for junit in sorted(results.glob("junit*.xml")):  # the host tier's, the VM's
        states.update(outcomes(junit))
    failed = [name for name, state in states.items() if state != "passed"]
    full = all(e["full"] for e in everything) if everything else False
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
    if attacks:
        out += attack_table(attacks)
    Path(output).write_text("\n".join(out) + "\n")
    print(
        f"wrote {output}: {len(entries)} rows, {len(attacks)} attacks, "
        f"{len(failed)} test(s) not passed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

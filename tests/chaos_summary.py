"""Print the summary table of ``make chaos`` from the records the chaos tests wrote.

Usage: ``python -m tests.chaos_summary RECORDS.jsonl``. Each line of the file is one record
(see the ``chaos_record`` fixture in ``tests/conftest.py``): a bad input tried, a fault
injected, or a run made. Exits with status 1 when a sample was lost or nothing was recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("kind", "what", "outcome", "runs", "completed", "samples", "lost")


def load(path: Path) -> list[dict]:
    """The records of a JSON-lines file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def totals(records: list[dict]) -> dict[str, int]:
    """Inputs tried, faults injected, runs completed and samples lost over all records.

    Bad inputs are tried inside the runs recorded as ``run`` (one run, many inputs), so only
    ``fault`` and ``run`` records count towards the runs.
    """
    return {
        "inputs tried": sum(1 for r in records if r["kind"] == "input"),
        "faults injected": sum(int(r.get("injected", 0)) for r in records if r["kind"] == "fault"),
        "runs completed": sum(int(r["completed"]) for r in records if r["kind"] != "input"),
        "samples lost": sum(int(r["lost"]) for r in records),
    }


def table(records: list[dict]) -> str:
    """The records as an aligned text table, inputs first, then faults, then runs."""
    order = {"input": 0, "fault": 1, "run": 2}
    rows = [COLUMNS] + [
        tuple(str(r.get(c, "completed" if c == "outcome" else "")) for c in COLUMNS)
        for r in sorted(records, key=lambda r: (order.get(r["kind"], 3), r["what"]))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = {"runs", "completed", "samples", "lost"}
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(width) if COLUMNS[i] in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Print the table and the totals; 1 when a sample was lost or nothing was recorded."""
    if len(argv) != 1:
        print("usage: python -m tests.chaos_summary RECORDS.jsonl", file=sys.stderr)
        return 2
    records = load(Path(argv[0]))
    if not records:
        print(f"chaos: no records in {argv[0]} (did the chaos tests run?)")
        return 1
    summary = totals(records)
    print("\nmusc chaos summary\n")
    print(table(records))
    print()
    print("   ".join(f"{name}: {value}" for name, value in summary.items()))
    if summary["samples lost"]:
        print("FAIL: samples were lost")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``musc verdict LINE SAMPLE ok|defect [--note] [--batch] [--storage]``: an operator's word.

Kept out of :mod:`flows.cli` so that the command's parser and its work sit in one place; the
command needs no Prefect server (it reads and writes the line's records directly).
"""

from __future__ import annotations

import argparse
import os

from tasks.choices import VERDICTS


def add_verdict_parser(sub: argparse._SubParsersAction, default_storage: str) -> None:
    """Register the ``verdict`` subcommand."""
    verdict = sub.add_parser(
        "verdict",
        help="record an operator's verdict on a scored sample (ok clears a flag for the bank)",
    )
    verdict.add_argument("line", help="the line (category) name")
    verdict.add_argument("sample", help="the sample's name, as in scores.csv")
    verdict.add_argument("verdict", choices=VERDICTS,
                         help="ok: normal (a cleared flag joins the bank); defect: confirmed")
    verdict.add_argument("--note", default="", help="free text stored with the verdict")
    verdict.add_argument("--batch", default=None,
                         help="the night (default: the latest batch with that sample)")
    verdict.add_argument("--storage", default=os.environ.get("MUSC_STORAGE", default_storage))


def run_verdict(args: argparse.Namespace) -> int:
    """Store the verdict and print what was stored; returns the exit status."""
    from tasks.records.verdicts import record_verdict

    stored = record_verdict(
        args.storage, args.line, args.sample, args.verdict, note=args.note, batch=args.batch
    )
    flagged = "flagged" if stored["flagged"] else "not flagged"
    bank = (
        "stays out of the bank"
        if stored["verdict"] == "defect"
        else "may serve as a reference"
    )
    print(
        f"[{args.line}] verdict {stored['verdict']} on {stored['sample']!r} of batch "
        f"{stored['batch']} ({flagged} in its night): it {bank} from now on"
    )
    return 0

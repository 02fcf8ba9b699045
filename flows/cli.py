"""Command line entry point (filled in below)."""


def main() -> None:
    """Run the musc command line."""
    raise SystemExit("not ready")

"""The ``rescore`` flow placeholder (filled in below)."""

"""Regenerate ``docs/report-screenshot.png`` from a real ``score_line`` run (random weights).

Writes a synthetic 16-sample line (MVTec 3D-AD layout, 224 px, 2D+3D), scores it with the
``score-line`` flow with the paper's backbone shapes — DINO ViT-B/8 and Point-MAE, both with
**random weights** (nothing is downloaded; the report's red banner says the results are not
meaningful) — and takes a full-page screenshot of the run's ``report.html`` with headless
Chromium (Debian ``chromium`` + ``chromium-driver``, driven by selenium as the report test
does). The PNG is re-encoded with a 256-colour palette when it would exceed 1 MB.

Usage (``make screenshot`` runs it)::

    .venv/bin/python docs/make_screenshot.py [--work DIR] [--num-samples 16] [--out PNG]

``--work`` keeps the line, the feature cache and the results (the line's batch ``shot``
then serves as a bank for ``musc score-new``); by default a temporary folder is used. A batch
record is never replaced: name a new ``--work`` folder for each run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

MAX_BYTES = 1_000_000


def score_synthetic_line(work: Path, num_samples: int) -> dict:
    """Generate the line and score it with the ``score-line`` flow; the run's summary."""
    from flows.score_line import score_line
    from flows.settings import Algorithm, Backbones, LineInput, LineRun
    from infra.prefect_api import prefect_api
    from tasks.synthetic.generator import generate_line

    data = work / "line"
    generate_line(data, category="part", num_samples=num_samples, image_size=224, seed=0)
    with prefect_api():
        return score_line(
            data=LineInput(data=str(data), data_format="mvtec3d", category="part"),
            batch="shot",
            backbones=Backbones(weights_2d="random", weights_3d="random"),
            algorithm=Algorithm(modality="2d+3d"),
            run=LineRun(storage=str(work / "store"), out=str(work / "results"),
                        cluster="threads"),
        )


def report_png(page: Path, profile: Path) -> bytes:
    """A full-page PNG of a local HTML file rendered by headless Chromium."""
    from infra.browser import chromium_paths, full_page_png, start_chromium

    browser, driver_path = chromium_paths()
    if not (browser and driver_path):
        raise SystemExit("chromium and chromedriver are needed: make test-deps")
    driver = start_chromium(browser, driver_path, profile, height=4000)
    try:
        driver.get(page.as_uri())
        return full_page_png(driver)
    finally:
        driver.quit()


def shrink(png: bytes, limit: int = MAX_BYTES) -> bytes:
    """The PNG re-encoded (optimized; with a 256-colour palette when still over ``limit``)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > limit:
        buffer = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            buffer, format="PNG", optimize=True
        )
    return buffer.getvalue()


def main() -> int:
    """Run the line, take the screenshot, write the PNG; prints what it did."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder to keep the run in")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "report-screenshot.png")
    args = parser.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    with tempfile.TemporaryDirectory(prefix="musc-shot-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        summary = score_synthetic_line(work, args.num_samples)
        print(f"scored {summary['scored']} samples in {summary['seconds']:.1f} s "
              f"(random weights: {summary['random_weights']})")
        png = shrink(report_png(Path(summary["outputs"]["report"]), Path(scratch) / "profile"))
    args.out.write_bytes(png)
    size = Image.open(io.BytesIO(png)).size
    print(f"{args.out}: {size[0]}x{size[1]} px, {len(png) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

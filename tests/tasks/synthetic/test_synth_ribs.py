"""The ``ribs`` object kind: two surfaces side by side, rendered only when asked for by name."""

import numpy as np

from tasks.synthetic.generator import NAMED_SHAPES, SHAPES, generate_line, plan_line, render_sample

SIZE = 128


def test_ribs_is_never_drawn_from_a_seed():
    assert "ribs" in NAMED_SHAPES and "ribs" not in SHAPES
    shapes = {plan_line(num_samples=1, image_size=64, seed=s)[0].shape for s in range(30)}
    assert "ribs" not in shapes


def test_ribs_has_rib_tops_and_groove_floors_3_mm_apart_side_by_side():
    model, specs = plan_line(num_samples=1, image_size=SIZE, seed=0, shape="ribs",
                             support_plane=False, defect_rate=0.0)
    xyz = render_sample(model, specs[0]).xyz
    measured = np.all(xyz != 0, axis=-1)
    row = SIZE // 2
    depth = xyz[row, :, 2][measured[row]]
    # Along a row across the ribs the depth alternates between two levels 3 mm apart.
    levels = np.sort(depth)
    low, high = np.median(levels[: len(levels) // 3]), np.median(levels[-len(levels) // 3 :])
    assert 0.0025 < high - low < 0.0035
    top = depth < 0.5 * (low + high)
    assert np.count_nonzero(np.diff(top.astype(int))) >= 10  # at least five ribs crossed


def test_ribs_line_is_written_and_deterministic(tmp_path):
    for name in ("a", "b"):
        generate_line(tmp_path / name, num_samples=3, image_size=64, seed=1, shape="ribs",
                      defect_rate=0.7)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tiff"))
    assert len(files) == 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()

"""benchmarks.chart: the sweep's PNG, drawn with matplotlib."""

import matplotlib.colors
import matplotlib.image
import numpy as np
from _bench import sweep_rows

from benchmarks.chart import COLORS, SIZE, sweep_png


def test_sweep_png_is_a_png_with_every_line(tmp_path):
    png = tmp_path / "sweep.png"
    sweep_png(sweep_rows(), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(png))
    assert image.shape[:2] == (SIZE[1], SIZE[0]) == (440, 960)
    pixels = image[..., :3].reshape(-1, 3)
    # Each gradient's line and markers are drawn in its own color (the markers' insides are
    # that color exactly); a missing line fails.
    for name, color in COLORS.items():
        near = np.abs(pixels - np.array(matplotlib.colors.to_rgb(color))).max(axis=1) < 0.02
        assert near.sum() >= 50, (name, int(near.sum()))
    assert len(np.unique(pixels, axis=0)) >= 5  # background, axes and text, lines

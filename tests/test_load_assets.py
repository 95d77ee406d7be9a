"""The shipped example asset loads through the Gaussian initialisers."""
import os

import torch

from scoredistill.geometry.gaussian_init import load_mesh, sample_mesh_surface

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "load", "shapes", "octahedron.obj")


def test_octahedron_asset_loads_with_vertex_colours_and_samples_its_surface():
    verts, faces, colors = load_mesh(ASSET)
    assert verts.shape == (6, 3) and faces.shape == (8, 3)
    assert colors is not None and torch.allclose(colors[0], torch.tensor([1.0, 0.0, 0.0]), atol=1 / 255)
    pts, cols = sample_mesh_surface(verts, faces, 2000, colors, generator=torch.Generator().manual_seed(0))
    # every sample lies on the surface |x| + |y| + |z| = 0.5
    torch.testing.assert_close(pts.abs().sum(-1), torch.full((2000,), 0.5), atol=1e-5, rtol=0)
    assert cols.shape == (2000, 3) and cols.min() >= 0 and cols.max() <= 1

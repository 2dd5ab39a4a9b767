import math

import numpy as np
import pytest
import torch

from emcaps.data.raycast import BOX, CYLINDER, SPHERE, Primitive, Scene, intersect, rotation, surface_normals


def scene_of(*prims):
    return Scene.stack([list(prims)])


def cast(scene, origin, direction):
    o = torch.tensor([[origin]], dtype=torch.float32)
    d = torch.tensor([[direction]], dtype=torch.float32)
    t, index = intersect(scene, o, d)
    return t.item(), index.item(), surface_normals(scene, index, o + t.unsqueeze(-1) * d)[0, 0]


@pytest.mark.parametrize("kind", [SPHERE, BOX, CYLINDER])
def test_axis_ray_hits_front_face(kind):
    prim = Primitive(kind, np.array([0.0, 0, 0]), np.eye(3), np.array([2.0, 1.0, 1.0]))
    t, index, normal = cast(scene_of(prim), [5.0, 0, 0], [-1.0, 0, 0])
    assert t == pytest.approx(3.0, abs=1e-5) and index == 0
    assert torch.allclose(normal, torch.tensor([1.0, 0, 0]), atol=1e-5)


def test_cylinder_cap_and_miss():
    prim = Primitive(CYLINDER, np.array([0.0, 0, 1]), np.eye(3), np.array([0.5, 0.5, 1.0]))
    t, _, normal = cast(scene_of(prim), [0.1, 0, 5], [0, 0, -1.0])
    assert t == pytest.approx(3.0, abs=1e-5)
    assert torch.allclose(normal, torch.tensor([0, 0, 1.0]), atol=1e-5)
    t, _, _ = cast(scene_of(prim), [0.6, 0, 5], [0, 0, -1.0])
    assert math.isinf(t)


def test_rotated_scaled_ellipsoid_normal_is_unit_and_outward():
    prim = Primitive(SPHERE, np.array([1.0, 2, 3]), rotation("z", 30) @ rotation("x", 20), np.array([1.0, 0.3, 0.6]))
    t, _, normal = cast(scene_of(prim), [1.0, 2, 10], [0, 0, -1.0])
    assert math.isfinite(t) and normal.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert normal[2] > 0


def test_nearest_of_several_wins_and_kinds_are_grouped():
    far = Primitive(BOX, np.array([0.0, 0, 0]), np.eye(3), np.array([1.0, 1, 1]))
    near = Primitive(SPHERE, np.array([3.0, 0, 0]), np.eye(3), np.array([0.5, 0.5, 0.5]))
    scene = scene_of(far, near)
    assert scene.kinds.tolist() == [SPHERE, BOX]
    t, index, _ = cast(scene, [10.0, 0, 0], [-1.0, 0, 0])
    assert t == pytest.approx(6.5, abs=1e-5) and index == 0


def test_mismatched_layouts_rejected():
    a = Primitive(BOX, np.zeros(3), np.eye(3), np.ones(3))
    b = Primitive(SPHERE, np.zeros(3), np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="share their primitive kinds"):
        Scene.stack([[a], [b]])

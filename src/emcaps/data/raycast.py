"""Batched analytic ray casting of ellipsoids, boxes and capped cylinders in torch.

Each primitive is the image of a canonical solid (unit sphere, cube [-1, 1]^3, or cylinder
x^2 + y^2 <= 1, |z| <= 1) under a rotation and axis scaling; a ray is mapped into the primitive's
local frame, where the intersection is a closed-form quadratic or slab test. Because the map is
affine, the ray parameter t is the same in both frames, so hits of different primitives compare
directly. No per-pixel Python loops: every function works on whole batches of rays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPHERE, BOX, CYLINDER = 0, 1, 2
KIND_NAMES = {SPHERE: "ellipsoid", BOX: "box", CYLINDER: "cylinder"}
_EPS = 1e-4


def rotation(axis: str, degrees: float) -> np.ndarray:
    """(3, 3) rotation matrix about the x, y or z axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


@dataclass(frozen=True)
class Primitive:
    """A solid: ``kind``; ``center`` (3,); ``rotation`` (3, 3) local-to-world; ``half_size`` (3,) axis radii."""

    kind: int
    center: np.ndarray
    rotation: np.ndarray
    half_size: np.ndarray
    albedo: float = 1.0

    def corners(self) -> np.ndarray:
        """(8, 3) world corners of the local bounding cube: a conservative bound for every kind."""
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
        return self.center + (signs * self.half_size) @ self.rotation.T


@dataclass(frozen=True)
class Scene:
    """A batch of B scenes with the same K primitive kinds, grouped so each kind is contiguous.

    kinds: (K,) long; world_to_local: (B, K, 3, 3); centers: (B, K, 3); albedo: (B, K).
    """

    kinds: torch.Tensor
    world_to_local: torch.Tensor
    centers: torch.Tensor
    albedo: torch.Tensor

    @staticmethod
    def stack(objects: list[list[Primitive]]) -> Scene:
        """Build a batch from B primitive lists that share their sequence of kinds."""
        order = sorted(range(len(objects[0])), key=lambda k: objects[0][k].kind)
        layouts = {tuple(prims[k].kind for k in order) for prims in objects}
        if len(layouts) != 1:
            raise ValueError(f"scenes in one batch must share their primitive kinds, got {layouts}")
        kinds = torch.tensor(layouts.pop(), dtype=torch.long)
        world_to_local = torch.tensor(np.array(
            [[(prims[k].rotation / prims[k].half_size).T for k in order] for prims in objects]
        ), dtype=torch.float32)
        centers = torch.tensor(np.array([[prims[k].center for k in order] for prims in objects]),
                               dtype=torch.float32)
        albedo = torch.tensor([[prims[k].albedo for k in order] for prims in objects], dtype=torch.float32)
        return Scene(kinds, world_to_local, centers, albedo)

    def select(self, index: torch.Tensor) -> Scene:
        """The scenes at ``index`` (B',), e.g. one row per rendered view."""
        return Scene(self.kinds, self.world_to_local[index], self.centers[index], self.albedo[index])


def _to_local(scene: Scene, start: int, stop: int, origins: torch.Tensor, dirs: torch.Tensor):
    """Rays (B, R, 3) into the frames of primitives start:stop: origins and dirs (B, k, R, 3)."""
    matrix = scene.world_to_local[:, start:stop]
    local_origin = torch.einsum("bkij,brj->bkri", matrix, origins) - torch.einsum(
        "bkij,bkj->bki", matrix, scene.centers[:, start:stop]
    ).unsqueeze(2)
    local_dir = torch.einsum("bkij,brj->bkri", matrix, dirs)
    return local_origin, local_dir


def _hit_sphere(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Entry t of rays o + t d (..., 3) into the unit sphere; inf for a miss. Returns (...)."""
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    disc = b * b - a * c
    t = (-b - disc.clamp_min(0).sqrt()) / a
    return torch.where((disc > 0) & (t > _EPS), t, torch.full_like(t, math.inf))


def _hit_box(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Entry t into the cube [-1, 1]^3 by the slab test; inf for a miss. (..., 3) -> (...)."""
    inv = 1.0 / d
    t1 = (-1.0 - o) * inv
    t2 = (1.0 - o) * inv
    near = torch.minimum(t1, t2).amax(-1)
    far = torch.maximum(t1, t2).amin(-1)
    return torch.where((near <= far) & (near > _EPS), near, torch.full_like(near, math.inf))


def _hit_cylinder(o: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Entry t into the capped cylinder x^2 + y^2 <= 1, |z| <= 1; inf for a miss. (..., 3) -> (...)."""
    a = (d[..., :2] ** 2).sum(-1).clamp_min(1e-12)
    b = (o[..., :2] * d[..., :2]).sum(-1)
    c = (o[..., :2] ** 2).sum(-1) - 1.0
    disc = b * b - a * c
    root = disc.clamp_min(0).sqrt()
    inv_z = 1.0 / d[..., 2]
    z1 = (-1.0 - o[..., 2]) * inv_z
    z2 = (1.0 - o[..., 2]) * inv_z
    near = torch.maximum((-b - root) / a, torch.minimum(z1, z2))
    far = torch.minimum((-b + root) / a, torch.maximum(z1, z2))
    return torch.where((disc > 0) & (near <= far) & (near > _EPS), near, torch.full_like(near, math.inf))


_HIT = {SPHERE: _hit_sphere, BOX: _hit_box, CYLINDER: _hit_cylinder}


def intersect(scene: Scene, origins: torch.Tensor, dirs: torch.Tensor,
              budget: int = 1 << 19) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit of rays (B, R, 3) with scene batch B: t (B, R) (inf: miss) and primitive index (B, R).

    Works through the batch in chunks of about ``budget`` ray-primitive pairs so temporaries stay in cache.
    """
    kinds = scene.kinds.tolist()
    groups = []
    start = 0
    while start < len(kinds):
        stop = start
        while stop < len(kinds) and kinds[stop] == kinds[start]:
            stop += 1
        groups.append((kinds[start], start, stop))
        start = stop
    step = max(1, budget // max(1, len(kinds) * origins.shape[1]))
    results = []
    for first in range(0, origins.shape[0], step):
        part = slice(first, first + step)
        chunk = Scene(scene.kinds, scene.world_to_local[part], scene.centers[part], scene.albedo[part])
        ts = []
        for kind, start, stop in groups:
            local_origin, local_dir = _to_local(chunk, start, stop, origins[part], dirs[part])
            ts.append(_HIT[kind](local_origin, local_dir))
        results.append(torch.cat(ts, dim=1).min(dim=1))
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def surface_normals(scene: Scene, index: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Unit world normals (B, R, 3) at surface ``points`` (B, R, 3) of primitives ``index`` (B, R)."""
    batch = torch.arange(index.shape[0]).unsqueeze(1)
    matrix = scene.world_to_local[batch, index]
    p = torch.einsum("brij,brj->bri", matrix, points - scene.centers[batch, index])
    kind = scene.kinds[index]
    magnitude = p.abs()
    box_normal = torch.where(magnitude == magnitude.amax(-1, keepdim=True), p.sign(), torch.zeros_like(p))
    radial = p[..., :2].norm(dim=-1, keepdim=True)
    on_cap = magnitude[..., 2:] > radial
    cylinder_normal = torch.where(on_cap, torch.cat([torch.zeros_like(p[..., :2]), p[..., 2:].sign()], -1),
                                  torch.cat([p[..., :2], torch.zeros_like(p[..., 2:])], -1))
    local = torch.where((kind == SPHERE).unsqueeze(-1), p,
                        torch.where((kind == BOX).unsqueeze(-1), box_normal, cylinder_normal))
    world = torch.einsum("brji,brj->bri", matrix, local)
    return torch.nn.functional.normalize(world, dim=-1)

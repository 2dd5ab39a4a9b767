"""SynthNORB: a procedurally rendered stand-in for smallNORB, written in smallNORB's own files.

Five categories of toy objects built from ellipsoids, boxes and cylinders (see ``synth_objects``),
ten instances each, photographed like smallNORB: 18 azimuths x 9 elevations x 6 lightings x 2 stereo
cameras, on a turntable (the ground plane) that receives the object's cast shadow. The output
directory holds the same six ``.mat`` files as smallNORB, so ``SmallNORB`` reads it unchanged, plus
``synthnorb.json`` recording how it was made. It lets the whole project run and be tested offline.

Rendering is analytic ray casting in torch (``raycast``). Geometry is cast once per view and shaded
for all six lightings at once; ground shadows are cast once per (object, azimuth, lighting) into a
small texture shared by every elevation and camera.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from emcaps.data.norb_format import NorbFormatError, create_norb_memmap
from emcaps.data.raycast import Scene, intersect, surface_normals
from emcaps.data.smallnorb import SPLIT_FILES, TEST_INSTANCES, TRAIN_INSTANCES
from emcaps.data.synth_objects import CATEGORY_NAMES, make_object, object_height
from emcaps.progress import progress_bar

FORMAT_VERSION = 1
MANIFEST = "synthnorb.json"
N_AZIMUTHS, N_ELEVATIONS, N_LIGHTINGS = 18, 9, 6


@dataclass(frozen=True)
class Subset:
    """Which viewpoints and lightings to render, by smallNORB index (azimuth i is 20*i degrees)."""

    name: str
    azimuths: tuple[int, ...] = tuple(range(N_AZIMUTHS))
    elevations: tuple[int, ...] = tuple(range(N_ELEVATIONS))
    lightings: tuple[int, ...] = tuple(range(N_LIGHTINGS))

    def __post_init__(self) -> None:
        for field, values, count in (("azimuths", self.azimuths, N_AZIMUTHS),
                                     ("elevations", self.elevations, N_ELEVATIONS),
                                     ("lightings", self.lightings, N_LIGHTINGS)):
            if not values or len(set(values)) != len(values) or not all(0 <= v < count for v in values):
                raise ValueError(f"subset {self.name!r}: {field} must be distinct indices in 0..{count - 1}, "
                                 f"got {values}")


SUBSETS = MappingProxyType({
    "full": Subset("full"),
    "small": Subset("small", azimuths=tuple(range(0, 18, 2)), elevations=(0, 2, 4, 6, 8), lightings=(0, 2, 4)),
    "tiny": Subset("tiny", azimuths=(0, 3, 9, 15, 17), elevations=(0, 4, 8), lightings=(0, 3)),
})


@dataclass(frozen=True)
class Camera:
    """The rig: perspective cameras ``distance`` from the object's centre, stereo ``baseline`` apart."""

    distance: float = 3.6
    half_fov_deg: float = 17.0
    baseline: float = 0.35


# One directional light per condition: (azimuth relative to the cameras, elevation, strength, ambient).
LIGHTINGS = (
    (-40.0, 60.0, 0.85, 0.25),
    (40.0, 60.0, 0.85, 0.25),
    (-95.0, 35.0, 0.9, 0.18),
    (95.0, 35.0, 0.9, 0.18),
    (0.0, 85.0, 0.7, 0.35),
    (180.0, 45.0, 0.6, 0.4),
)
GROUND_ALBEDO = 0.5
SHADOW_EXTENT = 2.5
SHADOW_TEXELS = 48


def resolve_subset(subset: str | Subset | None) -> Subset:
    if subset is None:
        return SUBSETS["full"]
    if isinstance(subset, Subset):
        return subset
    if subset not in SUBSETS:
        raise ValueError(f"unknown SynthNORB subset {subset!r}; choose one of {sorted(SUBSETS)}")
    return SUBSETS[subset]


def light_directions(azimuth_deg: torch.Tensor, lightings: tuple[int, ...]) -> torch.Tensor:
    """Unit directions towards each light (A, L, 3) in the object frame for camera azimuths (A,)."""
    table = torch.tensor([LIGHTINGS[i][:2] for i in lightings], dtype=torch.float32)
    az = torch.deg2rad(azimuth_deg[:, None] + table[None, :, 0])
    el = torch.deg2rad(table[None, :, 1]).expand_as(az)
    return torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], dim=-1)


def shadow_textures(scene: Scene, lights: torch.Tensor, texels: int = SHADOW_TEXELS,
                    extent: float = SHADOW_EXTENT) -> torch.Tensor:
    """Soft shadow coverage (B, L, T, T) of the ground square [-extent, extent]^2 for lights (B, L, 3)."""
    batch, n_lights = lights.shape[:2]
    centres = (torch.arange(texels, dtype=torch.float32) + 0.5) / texels * 2 * extent - extent
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    origins = torch.stack([x, y, torch.full_like(x, 1e-3)], dim=-1).reshape(1, -1, 3)
    rows = torch.arange(batch).repeat_interleave(n_lights)
    dirs = lights.reshape(-1, 1, 3).expand(-1, origins.shape[1], 3)
    t, _ = intersect(scene.select(rows), origins.expand(len(rows), -1, -1), dirs)
    covered = torch.isfinite(t).float().reshape(batch * n_lights, 1, texels, texels)
    soft = torch.nn.functional.avg_pool2d(covered, 3, stride=1, padding=1, count_include_pad=False)
    return soft.reshape(batch, n_lights, texels, texels)


def camera_rays(eye: torch.Tensor, target: torch.Tensor, size: int, half_fov_deg: float) -> torch.Tensor:
    """Ray directions (B, size*size, 3), row-major from the top-left pixel, for cameras at eye (B, 3)."""
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up_world = torch.tensor([0.0, 0.0, 1.0]).expand_as(forward)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_world), dim=-1)
    up = torch.linalg.cross(right, forward)
    span = math.tan(math.radians(half_fov_deg))
    coords = ((torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1) * span
    row, col = torch.meshgrid(-coords, coords, indexing="ij")
    grid = torch.stack([col.reshape(-1), row.reshape(-1)], dim=-1)
    return forward[:, None] + grid[None, :, :1] * right[:, None] + grid[None, :, 1:] * up[:, None]


def object_rays(size: int, camera: Camera) -> torch.Tensor:
    """Indices (R,) of the pixels whose rays can meet an object inside the unit sphere at the target."""
    span = math.tan(math.radians(camera.half_fov_deg))
    reach = math.tan(math.asin(min(1.0, 1.0 / camera.distance)) + math.radians(3)) / span
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.nonzero((row**2 + col**2).reshape(-1) <= reach**2).squeeze(1)


def render_views(scene: Scene, eye: torch.Tensor, target: torch.Tensor, lights: torch.Tensor,
                 lighting_ids: tuple[int, ...], shadows: torch.Tensor, size: int,
                 camera: Camera) -> torch.Tensor:
    """Radiance (B, L, size, size) of scene rows (B) seen from eye (B, 3) under lights (B, L, 3).

    ``shadows`` (B, L, T, T) are the ground shadow textures of each view's object under each light.
    Geometry is cast once per view; the L lightings only change the (cheap) shading.
    """
    batch, n_lights = lights.shape[:2]
    table = torch.tensor([LIGHTINGS[i][2:] for i in lighting_ids], dtype=torch.float32)
    strength, ambient = table[None, :, 0, None], table[None, :, 1, None]
    dirs = camera_rays(eye, target, size, camera.half_fov_deg)
    t_ground = -eye[:, 2:3] / dirs[..., 2]
    ground_xy = eye[:, None, :2] + t_ground.unsqueeze(-1) * dirs[..., :2]
    coverage = torch.nn.functional.grid_sample(
        shadows, ground_xy[:, None] / SHADOW_EXTENT, mode="bilinear", padding_mode="zeros", align_corners=False
    )[:, :, 0]
    sun = lights[..., 2:3].clamp_min(0)
    radiance = GROUND_ALBEDO * (ambient + strength * sun * (1 - coverage))

    rays = object_rays(size, camera)
    ray_dirs = dirs[:, rays]
    ray_origins = eye[:, None].expand_as(ray_dirs)
    t, index = intersect(scene, ray_origins, ray_dirs)
    hit = t < t_ground[:, rays]
    points = ray_origins + torch.where(hit, t, torch.zeros_like(t)).unsqueeze(-1) * ray_dirs
    normals = surface_normals(scene, index, points)
    facing = torch.einsum("brk,blk->blr", normals, lights).clamp_min(0)
    albedo = scene.albedo[torch.arange(batch)[:, None], index]
    lit = albedo[:, None] * (ambient + strength * facing)
    radiance[:, :, rays] = torch.where(hit[:, None], lit, radiance[:, :, rays])
    return radiance.reshape(batch, n_lights, size, size)


def to_pixels(radiance: torch.Tensor) -> torch.Tensor:
    """Radiance (...) in [0, 1] to display-gamma uint8 grey levels (...)."""
    return (radiance.clamp(0, 1) ** (1 / 2.2) * 255).round().to(torch.uint8)


def camera_positions(azimuth_deg: torch.Tensor, elevation_deg: float, target: torch.Tensor,
                     camera: Camera) -> torch.Tensor:
    """Eyes (A, 2, 3) of the left and right cameras for azimuths (A,), both aimed at target (3,) (toe-in)."""
    az = torch.deg2rad(azimuth_deg)
    el = math.radians(elevation_deg)
    toward = torch.stack([math.cos(el) * az.cos(), math.cos(el) * az.sin(),
                          torch.full_like(az, math.sin(el))], dim=-1)
    right = torch.stack([-az.sin(), az.cos(), torch.zeros_like(az)], dim=-1)
    centre = target + camera.distance * toward
    half = camera.baseline / 2
    return torch.stack([centre - half * right, centre + half * right], dim=1)


def _split_labels(subset: Subset, instances: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """cat (N,) and info (N, 4) in file order: category, instance, elevation, azimuth, lighting."""
    grids = np.meshgrid(np.arange(5), np.array(instances), np.array(subset.elevations),
                        np.array(subset.azimuths), np.array(subset.lightings), indexing="ij")
    category, instance, elevation, azimuth, lighting = (g.reshape(-1).astype(np.int32) for g in grids)
    info = np.stack([instance, elevation, 2 * azimuth, lighting], axis=1).astype(np.int32)
    return category, info


def render_split(out_dir: Path, split: str, size: int, seed: int, subset: Subset, camera: Camera,
                 progress: bool) -> None:
    """Render one split into the six smallNORB-named files' three of ``split`` in ``out_dir``."""
    instances = TRAIN_INSTANCES if split == "train" else TEST_INSTANCES
    names = SPLIT_FILES[split]
    category, info = _split_labels(subset, instances)
    create_norb_memmap(out_dir / names["cat"], np.int32, category.shape)[:] = category
    create_norb_memmap(out_dir / names["info"], np.int32, info.shape)[:] = info
    images = create_norb_memmap(out_dir / names["dat"], np.uint8, (len(category), 2, size, size))
    azimuths = torch.tensor(subset.azimuths, dtype=torch.float32) * 20
    lights = light_directions(azimuths, subset.lightings)
    n_az, n_light = len(subset.azimuths), len(subset.lightings)
    row = 0
    with torch.inference_mode(), progress_bar(len(category), f"SynthNORB {split}", enabled=progress,
                                              unit="pair") as bar:
        for cat in range(len(CATEGORY_NAMES)):
            objects = [make_object(cat, seed, i) for i in instances]
            scene = Scene.stack(objects)
            shadow_rows = torch.arange(len(instances)).repeat_interleave(n_az)
            shadows = shadow_textures(scene.select(shadow_rows), lights.repeat(len(instances), 1, 1))
            shadows = shadows.reshape(len(instances), n_az, n_light, SHADOW_TEXELS, SHADOW_TEXELS)
            n_el = len(subset.elevations)
            for k, parts in enumerate(objects):
                target = torch.tensor([0.0, 0.0, object_height(parts) / 2])
                views = scene.select(torch.full((n_el * n_az * 2,), k, dtype=torch.long))
                view_lights = lights.repeat_interleave(2, dim=0).repeat(n_el, 1, 1)
                view_shadows = shadows[k].repeat_interleave(2, dim=0).repeat(n_el, 1, 1, 1)
                eyes = torch.cat([camera_positions(azimuths, 30.0 + 5.0 * e, target, camera).reshape(-1, 3)
                                  for e in subset.elevations])
                radiance = render_views(views, eyes, target.expand_as(eyes), view_lights, subset.lightings,
                                        view_shadows, size, camera)
                pixels = to_pixels(radiance).reshape(n_el * n_az, 2, n_light, size, size).transpose(1, 2)
                count = n_el * n_az * n_light
                images[row:row + count] = pixels.reshape(-1, 2, size, size).numpy()
                row += count
                bar.update(count)
    images.flush()
    del images


def render_dataset(out_dir: str | os.PathLike, size: int = 96, seed: int = 0, subset: str | Subset | None = None,
                   progress: bool = True, camera: Camera = Camera()) -> Path:
    """Render both splits of SynthNORB into ``out_dir`` (smallNORB file names) and record how."""
    if size < 8:
        raise ValueError(f"SynthNORB size must be at least 8 pixels, got {size}")
    chosen = resolve_subset(subset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for split in ("train", "test"):
        render_split(out, split, size, seed, chosen, camera, progress)
    manifest = {
        "generator": "emcaps.data.synthnorb", "format_version": FORMAT_VERSION, "size": size, "seed": seed,
        "subset": chosen.name, "azimuths": list(chosen.azimuths), "elevations": list(chosen.elevations),
        "lightings": list(chosen.lightings), "render_seconds": round(time.perf_counter() - started, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest) + "\n")
    return out


def ensure_synthnorb(size: int = 96, seed: int = 0, subset: str | Subset | None = None,
                     data_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Render SynthNORB once into the cache and return its directory (atomic: temp dir, then rename)."""
    from emcaps.data.cache import default_data_dir

    chosen = resolve_subset(subset)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    final = root / f"synthnorb-v{FORMAT_VERSION}-{chosen.name}-{size}px-seed{seed}"
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        render_dataset(scratch, size=size, seed=seed, subset=chosen, progress=progress)
        try:
            os.replace(scratch, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def show(data_dir: str | os.PathLike, out_png: str | os.PathLike, split: str = "train",
         camera: int = 0) -> Path:
    """Montage of a smallNORB-format directory: one row per category, its azimuths across.

    Each row shows the first instance of the split at the lowest elevation and first lighting present.
    """
    from emcaps import plots
    from emcaps.data.smallnorb import SmallNORB

    data = SmallNORB(data_dir, split=split, cameras=(camera,))
    rows, azimuths = [], []
    for category in range(len(CATEGORY_NAMES)):
        mine = data.labels == category
        if not mine.any():
            raise NorbFormatError(data_dir, f"split {split} has no images of category {category}")
        first = ((data.instance == data.instance[mine].min()) & (data.elevation == data.elevation[mine].min())
                 & (data.lighting == data.lighting[mine].min()) & mine)
        picked = np.flatnonzero(first)
        picked = picked[np.argsort(data.azimuth[picked], kind="stable")]
        rows.append(np.stack([data[i][0][0].numpy() for i in picked]))
        azimuths = max(azimuths, data.azimuth[picked].tolist(), key=len)
    width, size = max(len(r) for r in rows), data.image_size
    tiles = np.full((len(rows), width, size, size), 255, np.uint8)              # (rows, columns, H, W)
    for r, row in enumerate(rows):
        tiles[r, :len(row)] = row
    return plots.image_grid(out_png, tiles.reshape(-1, size, size), columns=width, scale=max(1, 96 // size),
                            labels=CATEGORY_NAMES, col_labels=[str(a) for a in azimuths], value_range=(0, 255),
                            xlabel="azimuth (degrees)", title=f"{Path(data_dir).name}: {split} split, camera {camera}")

"""Procedural toy objects for SynthNORB, one generator per smallNORB category.

Every instance draws its own proportions, part sizes, part angles and paint from a numpy Generator,
so two instances of a category share a structure but not a shape: a test instance is an object the
training set never showed. Objects are normalised to a common size (radius 1 about their centre,
standing on z = 0, facing +x), as smallNORB's toys were photographed at a common scale.
"""

from __future__ import annotations

import numpy as np

from emcaps.data.raycast import BOX, CYLINDER, SPHERE, Primitive, rotation

CATEGORY_NAMES = ("animal", "human", "airplane", "truck", "car")


def _part(kind, center, half_size, rot=None, albedo=1.0) -> Primitive:
    return Primitive(kind, np.asarray(center, float), np.eye(3) if rot is None else rot,
                     np.asarray(half_size, float), albedo)


def _rod(start, end, radius, albedo=1.0) -> Primitive:
    """A cylinder from ``start`` to ``end`` (world points) of the given radius."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    axis = end - start
    length = np.linalg.norm(axis)
    z = axis / length
    helper = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return _part(CYLINDER, (start + end) / 2, (radius, radius, length / 2), np.stack([x, y, z], axis=1), albedo)


def _direction(pitch_deg: float, yaw_deg: float = 0.0) -> np.ndarray:
    """Unit vector pitched up from +x by ``pitch_deg``, then turned about z by ``yaw_deg``."""
    p, y = np.radians(pitch_deg), np.radians(yaw_deg)
    return np.array([np.cos(p) * np.cos(y), np.cos(p) * np.sin(y), np.sin(p)])


def animal(rng: np.random.Generator) -> list[Primitive]:
    u = rng.uniform
    body_l, body_w, body_h = u(0.45, 1.4), u(0.2, 0.55), u(0.18, 0.5)
    leg_len, leg_r = u(0.15, 1.1), u(0.05, 0.16)
    hip = leg_len + body_h * 0.6
    parts = [_part(SPHERE, (0, 0, hip), (body_l, body_w, body_h), rotation("y", u(-15, 15)))]
    splay = u(0, 20)
    for sx in (-1, 1):
        for sy in (-1, 1):
            top = np.array([sx * body_l * u(0.5, 0.75), sy * body_w * 0.55, hip])
            foot = top + np.array([sx * np.sin(np.radians(splay)) * leg_len + u(-0.25, 0.25), u(-0.1, 0.1), -hip])
            parts.append(_rod(top, foot, leg_r * u(0.85, 1.15)))
    neck_base = np.array([body_l * 0.75, 0, hip + body_h * 0.3])
    neck_tip = neck_base + _direction(u(-15, 80), u(-35, 35)) * u(0.1, 0.9)
    parts.append(_rod(neck_base, neck_tip, u(0.08, 0.18)))
    head = (u(0.12, 0.4), u(0.08, 0.22), u(0.08, 0.22))
    parts.append(_part(SPHERE, neck_tip + np.array([head[0] * 0.6, 0, 0]), head, rotation("y", u(-40, 30))))
    tail_base = np.array([-body_l * 0.9, 0, hip + body_h * 0.2])
    parts.append(_rod(tail_base, tail_base + _direction(180 - u(-50, 50), u(-30, 30)) * u(0.15, 0.7),
                      u(0.03, 0.08)))
    return parts


def human(rng: np.random.Generator) -> list[Primitive]:
    u = rng.uniform
    leg_len, leg_r = u(0.55, 1.15), u(0.05, 0.13)
    torso = (u(0.08, 0.24), u(0.15, 0.36), u(0.2, 0.45))
    hip_w = torso[1] * 0.55
    stride = u(-35, 35)
    parts = []
    for side, swing in ((-1, stride), (1, -stride)):
        hip = np.array([0, side * hip_w, leg_len])
        foot = hip + leg_len * _direction(-90 + swing)
        foot[1] += side * u(0, 0.2)
        parts.append(_rod(hip, foot, leg_r))
    waist = leg_len + torso[2]
    parts.append(_part(BOX, (0, 0, waist), torso, rotation("z", u(-15, 15)) @ rotation("y", u(-10, 10))))
    shoulder_z = waist + torso[2] * 0.8
    arm_len, arm_r = u(0.4, 0.95), u(0.04, 0.1)
    for side in (-1, 1):
        shoulder = np.array([0, side * (torso[1] + arm_r), shoulder_z])
        lift = np.radians(u(0, 150))
        swing = np.radians(u(-70, 70))
        direction = np.array([np.sin(swing) * np.cos(lift), side * np.sin(lift), -np.cos(lift) * np.cos(swing)])
        parts.append(_rod(shoulder, shoulder + arm_len * direction, arm_r))
    head_r = u(0.11, 0.18)
    parts.append(_part(SPHERE, (u(-0.03, 0.05), 0, shoulder_z + torso[2] * 0.2 + head_r),
                       (head_r * u(0.9, 1.15), head_r, head_r * u(1.0, 1.3))))
    return parts


def airplane(rng: np.random.Generator) -> list[Primitive]:
    u = rng.uniform
    length, radius = u(0.8, 1.6), u(0.07, 0.25)
    height = radius * u(1.2, 2.0)
    parts = [_part(SPHERE, (0, 0, height), (length, radius, radius * u(0.9, 1.2)))]
    chord, span, wing_x = u(0.12, 0.45), u(0.5, 1.6), u(-0.35, 0.25)
    sweep, dihedral = u(-10, 55), u(-8, 15)
    wing_z = u(-0.7, 0.7)
    for side in (-1, 1):
        rot = rotation("z", -side * sweep) @ rotation("x", side * dihedral)
        center = np.array([wing_x, 0, height + radius * wing_z]) + rot @ np.array([0, side * span / 2, 0])
        parts.append(_part(BOX, center, (chord, span / 2, 0.025), rot))
    tail_x = -length * u(0.75, 0.9)
    parts.append(_part(BOX, (tail_x, 0, height), (u(0.08, 0.18), u(0.25, 0.55), 0.02), rotation("z", 0)))
    fin_h = u(0.15, 0.4)
    parts.append(_part(BOX, (tail_x, 0, height + fin_h), (u(0.1, 0.22), 0.02, fin_h), rotation("y", -u(0, 30))))
    engine_y, engine_r = u(0.2, 0.45) * span, u(0.05, 0.1)
    for side in (-1, 1):
        start = np.array([wing_x + chord * u(0.3, 0.9), side * engine_y, height - engine_r * 1.4])
        parts.append(_rod(start, start - np.array([u(0.25, 0.5), 0, 0]), engine_r))
    return parts


def _wheels(rng: np.random.Generator, axles_x, half_track: float, radius: float) -> list[Primitive]:
    width = rng.uniform(0.05, 0.1)
    return [_rod((x, side * half_track - width, radius), (x, side * half_track + width, radius), radius,
                 albedo=0.45)
            for x in axles_x for side in (-1, 1)]


def truck(rng: np.random.Generator) -> list[Primitive]:
    u = rng.uniform
    length, width, wheel_r = u(0.9, 1.6), u(0.3, 0.55), u(0.12, 0.26)
    floor = wheel_r * u(1.1, 1.5)
    cab_l, cab_h = u(0.2, 0.45), u(0.22, 0.55)
    cargo_l, cargo_h = length - cab_l - 0.05, u(0.1, 0.8)
    parts = [
        _part(BOX, (0, 0, floor), (length, width * 0.9, 0.06)),
        _part(BOX, (length - cab_l, 0, floor + cab_h), (cab_l, width * u(0.85, 1.0), cab_h)),
        _part(BOX, (-length + cargo_l, 0, floor + cargo_h), (cargo_l, width, cargo_h)),
    ]
    rear = -length * u(0.45, 0.7)
    return parts + _wheels(rng, (length * u(0.6, 0.75), rear, rear - 2.2 * wheel_r), width * 0.85, wheel_r)


def car(rng: np.random.Generator) -> list[Primitive]:
    u = rng.uniform
    length, width, wheel_r = u(0.8, 1.35), u(0.32, 0.55), u(0.11, 0.22)
    body_h = u(0.08, 0.26)
    floor = wheel_r * u(0.9, 1.2) + body_h
    parts = [
        _part(BOX, (0, 0, floor), (length, width, body_h)),
        _part(SPHERE, (u(-0.3, 0.1) * length, 0, floor + body_h * 0.6),
              (length * u(0.3, 0.7), width * u(0.7, 1.0), u(0.1, 0.42)), rotation("y", u(-6, 6))),
    ]
    axle = length * u(0.55, 0.75)
    return parts + _wheels(rng, (axle, -axle), width * 0.85, wheel_r)


GENERATORS = (animal, human, airplane, truck, car)


def make_object(category: int, seed: int, instance: int) -> list[Primitive]:
    """Instance ``instance`` of ``category``, normalised to radius 1 about (0, 0, centre height)."""
    rng = np.random.default_rng([seed, category, instance])
    parts = GENERATORS[category](rng)
    paint = rng.uniform(0.6, 0.95)
    yaw = rotation("z", rng.uniform(-10, 10))
    corners = np.concatenate([p.corners() for p in parts]) @ yaw.T
    low, high = corners.min(0), corners.max(0)
    middle = (low + high) / 2
    scale = 1.0 / np.linalg.norm(corners - middle, axis=1).max()
    shift = np.array([middle[0], middle[1], low[2]])
    return [
        Primitive(p.kind, (yaw @ p.center - shift) * scale, yaw @ p.rotation, p.half_size * scale,
                  min(1.0, p.albedo * paint * shade))
        for p, shade in zip(parts, rng.uniform(0.8, 1.2, len(parts)))
    ]


def object_height(parts: list[Primitive]) -> float:
    """Top of a normalised object (its base is at z = 0)."""
    return float(np.concatenate([p.corners() for p in parts])[:, 2].max())

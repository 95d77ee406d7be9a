"""threestudio cameras -> gsplat cameras.  Plain torch, no threestudio import.

threestudio (``threestudio/data/uncond.py``) describes a camera by ``c2w [B, 4, 4]`` in the OpenGL
convention (camera x right, y up, looking down -z), the vertical field of view ``fovy [B]`` (radians)
and the image ``width``/``height``; pixel centres sit at ``(j + 0.5, i + 0.5)`` and the focal length in
pixels is ``0.5 * height / tan(fovy / 2)`` for both axes (square pixels).

gsplat wants world-to-camera ``viewmats [B, 4, 4]`` in the OpenCV convention (x right, y down, +z
forward) and pinhole intrinsics ``Ks [B, 3, 3] = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]`` (gsplat also
samples pixel centres at ``+0.5``).  The OpenGL -> OpenCV change flips the camera's y and z axes:
``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)``, ``viewmat = inverse(c2w_cv)``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor


def focal_from_fovy(fovy: Tensor, height: int) -> Tensor:
    """Focal length in pixels, ``0.5 * height / tan(fovy / 2)`` (threestudio's ``focal_length``)."""
    return 0.5 * height / torch.tan(0.5 * fovy)


def threestudio_to_gsplat_cameras(
    c2w: Tensor, fovy: Union[Tensor, float], width: int, height: int
) -> Tuple[Tensor, Tensor]:
    """Convert threestudio cameras to gsplat's ``(viewmats, Ks)``.

    Args:
        c2w: ``[B, 4, 4]`` (or ``[4, 4]``) camera-to-world, OpenGL convention.
        fovy: ``[B]`` (or scalar) vertical field of view in radians, in (0, pi).
        width, height: image size in pixels.

    Returns:
        ``viewmats [B, 4, 4]`` world-to-camera (OpenCV) and ``Ks [B, 3, 3]``, same dtype/device as c2w.

    Raises:
        ValueError: bad shapes, non-positive size or fovy outside (0, pi).
    """
    if c2w.ndim == 2:
        c2w = c2w[None]
    if c2w.ndim != 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must have shape [B, 4, 4], got {tuple(c2w.shape)}")
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    b = c2w.shape[0]
    fovy = torch.as_tensor(fovy, dtype=c2w.dtype, device=c2w.device).reshape(-1)
    if fovy.numel() == 1 and b > 1:
        fovy = fovy.expand(b)
    if fovy.shape[0] != b:
        raise ValueError(f"fovy has {fovy.shape[0]} entries for {b} cameras")
    fovy_ok = ((fovy > 0) & (fovy < torch.pi)).all()
    # the same call on every device: CUDA checks on the device (no host sync per step; fails at the next
    # sync), the CPU checks now (a host read, no device involved)
    try:
        torch._assert_async(fovy_ok, "fovy must be in (0, pi) radians")
    except RuntimeError:
        raise ValueError(f"fovy must be in (0, pi) radians, got {fovy.tolist()}") from None
    # OpenGL -> OpenCV camera axes: y and z columns negated (exact; a matmul with diag(1,-1,-1,1) copied from
    # the host was a synchronous copy per step on CUDA, and rounds under TF32)
    c2w_cv = torch.cat([c2w[..., :, :1], -c2w[..., :, 1:3], c2w[..., :, 3:]], dim=-1)
    # inv_ex: linalg.inv's error check reads the LAPACK info on the host (a sync per step on CUDA); a camera
    # pose is invertible by construction (rotation + translation)
    viewmats = torch.linalg.inv_ex(c2w_cv)[0]
    f = focal_from_fovy(fovy, height)
    Ks = torch.zeros(b, 3, 3, dtype=c2w.dtype, device=c2w.device)
    Ks[:, 0, 0] = f
    Ks[:, 1, 1] = f
    Ks[:, 0, 2] = width / 2.0
    Ks[:, 1, 2] = height / 2.0
    Ks[:, 2, 2] = 1.0
    return viewmats, Ks


def project_points(points: Tensor, viewmats: Tensor, Ks: Tensor) -> Tuple[Tensor, Tensor]:
    """Pinhole projection of world points ``[N, 3]`` -> pixel coordinates ``[B, N, 2]`` and depths ``[B, N]``."""
    pc = torch.einsum("bij,nj->bni", viewmats[:, :3, :3], points) + viewmats[:, None, :3, 3]
    uv = torch.einsum("bij,bnj->bni", Ks, pc)
    return uv[..., :2] / uv[..., 2:3], pc[..., 2]


def camera_ray_directions(c2w: Tensor, fovy: Tensor, width: int, height: int) -> Tensor:
    """Normalised world ray directions ``[B, H, W, 3]`` through pixel centres (threestudio's ``rays_d``)."""
    b = c2w.shape[0]
    f = focal_from_fovy(torch.as_tensor(fovy, dtype=c2w.dtype, device=c2w.device).reshape(-1).expand(b), height)
    j, i = torch.meshgrid(
        torch.arange(width, dtype=c2w.dtype, device=c2w.device) + 0.5,
        torch.arange(height, dtype=c2w.dtype, device=c2w.device) + 0.5,
        indexing="xy",
    )
    x = (j - width / 2.0)[None] / f[:, None, None]
    y = -(i - height / 2.0)[None] / f[:, None, None]
    d = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3] camera frame (OpenGL)
    d = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], d)
    return torch.nn.functional.normalize(d, dim=-1)

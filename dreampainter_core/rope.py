"""2D rotary position embeddings for target and reference tokens.

CogView4 does not use raw patch indices as RoPE positions. It rescales them so that
every target covers the same range whatever its size: for a target of ``H x W``
patches, row ``i`` gets position ``i * 256 // H`` (columns likewise), so positions
always lie in 0..255 per axis (``rope_axes_dim = (256, 256)``).

DreamPainter places the reference "diagonally beside the canvas": in raw patch units
the paper gives a reference token at grid ``(i, j)`` the position ``(h + i, w + j)``
where ``(h, w)`` is the target grid. Under CogView4's rescaling we translate that as:

* the shift is the full rescaled extent of the target, ``(256, 256)``: every target
  ends at 255, so every reference starts at 256 on both axes and can never overlap a
  target position, whatever the two sizes are;
* the reference keeps the *target's* scale, ``i * 256 // H`` (not its own), so one
  reference patch spans as many positions as one target patch, i.e. the reference
  sits beside the canvas at the same pixel scale, exactly as ``(h + i, w + j)`` does
  in raw units. A 512 px reference beside a 1024 px target spans 256..383; a reference
  larger than the target extends past 511 (positions are computed directly, not looked
  up in the 0..255 table, so any position is valid).

``reference_scale="own"`` instead rescales the reference by its own grid (it then
always spans 256..511); it is kept as an option and recorded in weight metadata.
"""

from __future__ import annotations

import torch

REFERENCE_SCALES = ("target", "own")
# Where reference tokens sit: "diagonal" (the paper's (h + i, w + j), what stage 2 trains
# with) or "beside" (same rows, to the right: (i, w + j), the in-context layout the
# training-free reference uses, as a diptych) or "overlay" (the target's own positions, OminiControl's
# choice for spatially aligned conditions: reference patch (i, j) sits where target patch (i, j) does).
REFERENCE_LAYOUTS = ("diagonal", "beside", "overlay")


def _inv_freq(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Same construction as diffusers' CogView4RotaryPosEmbed: half of the head dim per axis.
    dim_h = dim_w = head_dim // 2
    h_inv = 1.0 / (theta ** (torch.arange(0, dim_h, 2, dtype=torch.float32)[: (dim_h // 2)].float() / dim_h))
    w_inv = 1.0 / (theta ** (torch.arange(0, dim_w, 2, dtype=torch.float32)[: (dim_w // 2)].float() / dim_w))
    return h_inv, w_inv


def grid_positions(
    grid_h: int,
    grid_w: int,
    axes_dim: tuple[int, int] = (256, 256),
    offset: tuple[int, int] = (0, 0),
    scale_grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescaled RoPE positions (row, column) of a ``grid_h x grid_w`` token grid.

    ``scale_grid`` is the grid whose size defines the rescaling (default: this grid),
    ``offset`` is added afterwards. Returns two int64 vectors of length grid_h*grid_w
    in row-major token order.
    """
    scale_h, scale_w = scale_grid if scale_grid is not None else (grid_h, grid_w)
    rows = torch.arange(grid_h) * axes_dim[0] // scale_h + offset[0]
    cols = torch.arange(grid_w) * axes_dim[1] // scale_w + offset[1]
    return rows[:, None].expand(grid_h, grid_w).reshape(-1), cols[None, :].expand(grid_h, grid_w).reshape(-1)


def rope_cos_sin(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[N, head_dim]`` in the layout CogView4's attention expects."""
    h_inv, w_inv = _inv_freq(head_dim, theta)
    freqs_h = torch.outer(rows.to(torch.float32), h_inv)
    freqs_w = torch.outer(cols.to(torch.float32), w_inv)
    freqs = torch.cat([freqs_h, freqs_w], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def target_and_reference_positions(
    target_grid: tuple[int, int],
    reference_grid: tuple[int, int] | None,
    axes_dim: tuple[int, int] = (256, 256),
    reference_scale: str = "target",
    layout: str = "diagonal",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the target tokens followed by the reference tokens (if any)."""
    if reference_scale not in REFERENCE_SCALES:
        raise ValueError(f"reference_scale must be one of {REFERENCE_SCALES}, got {reference_scale!r}")
    if layout not in REFERENCE_LAYOUTS:
        raise ValueError(f"reference layout must be one of {REFERENCE_LAYOUTS}, got {layout!r}")
    rows, cols = grid_positions(*target_grid, axes_dim=axes_dim)
    if reference_grid is None:
        return rows, cols
    scale_grid = target_grid if reference_scale == "target" else reference_grid
    offset = {"diagonal": axes_dim, "beside": (0, axes_dim[1]), "overlay": (0, 0)}[layout]
    ref_rows, ref_cols = grid_positions(*reference_grid, axes_dim=axes_dim, offset=offset, scale_grid=scale_grid)
    return torch.cat([rows, ref_rows]), torch.cat([cols, ref_cols])


def dreampainter_rope(
    head_dim: int,
    target_grid: tuple[int, int],
    reference_grid: tuple[int, int] | None = None,
    axes_dim: tuple[int, int] = (256, 256),
    reference_scale: str = "target",
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    layout: str = "diagonal",
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = target_and_reference_positions(target_grid, reference_grid, axes_dim, reference_scale, layout)
    cos, sin = rope_cos_sin(rows, cols, head_dim, theta)
    if device is not None:
        cos, sin = cos.to(device), sin.to(device)
    return cos, sin

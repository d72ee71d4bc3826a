"""The 10 views of Krizhevsky et al. (2012), shared by ``owlnet test --multiview`` and
``owlnet classify --multiview``.

For an image of H x W and a crop of h x w the views are, in pycaffe's ``oversample`` order,
the windows at the four corners (top left, top right, bottom left, bottom right) and in the
centre, then the same five windows mirrored left to right. The centre window starts at
``((H - h) // 2, (W - w) // 2)``, the offset Caffe's data transformer uses at TEST.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import ShapeError

VIEWS = 10


class View(NamedTuple):
    """One window: its top-left corner and whether it is mirrored."""
    h_off: int
    w_off: int
    mirrored: bool


def ten_view_windows(height: int, width: int, crop_h: int, crop_w: int) -> list[View]:
    """The 10 windows of a ``crop_h x crop_w`` crop in a ``height x width`` image."""
    if crop_h > height or crop_w > width or min(crop_h, crop_w) <= 0:
        raise ShapeError(f"a {crop_h} x {crop_w} crop does not fit an image of "
                         f"{height} x {width}")
    bottom, right = height - crop_h, width - crop_w
    corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]
    return ([View(h, w, False) for h, w in corners] +
            [View(h, w, True) for h, w in corners])


def centre_view(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """The centre ``crop_h x crop_w`` window of a C x H x W ``image`` (a view of it): the 5th
    of the 10 views, pycaffe's single-view crop."""
    h_off, w_off, _ = ten_view_windows(image.shape[1], image.shape[2], crop_h, crop_w)[4]
    return image[:, h_off:h_off + crop_h, w_off:w_off + crop_w]


def ten_views(image: np.ndarray, crop_h: int, crop_w: int) -> tuple[np.ndarray, list[View]]:
    """The 10 crops of a C x H x W ``image`` as a 10 x C x crop_h x crop_w array (its dtype),
    with the windows they come from."""
    windows = ten_view_windows(image.shape[1], image.shape[2], crop_h, crop_w)
    crops = np.empty((VIEWS, image.shape[0], crop_h, crop_w), dtype=image.dtype)
    for k, (h_off, w_off, mirrored) in enumerate(windows):
        crop = image[:, h_off:h_off + crop_h, w_off:w_off + crop_w]
        crops[k] = crop[:, :, ::-1] if mirrored else crop
    return crops, windows

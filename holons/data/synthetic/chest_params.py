"""Parameters of a synthetic chest phantom: the structures, their landmark counts, one patient's
anatomy and one acquisition's settings (see ``chest_anatomy`` for the geometry they drive)."""

from __future__ import annotations

from dataclasses import dataclass

from holons.errors import HolonsError

STRUCTURES = ("right_lung", "left_lung", "heart", "right_clavicle", "left_clavicle")
LANDMARK_KEYS = {"right_lung": "RL", "left_lung": "LL", "heart": "H", "right_clavicle": "RCLA",
                 "left_clavicle": "LCLA"}
# Points per contour piece; the sums are the JSRT/SCR counts 44 / 50 / 26 / 23 / 23.
#   lungs:     apex -> lateral wall -> costophrenic angle | diaphragm -> cardiophrenic angle | medial border
#   heart:     right cardiophrenic angle -> right border | top | left border | bottom (diaphragm)
#   clavicles: lateral end, upper edge -> medial | sternal end | lower edge -> lateral | lateral end
PIECE_COUNTS = {
    "right_lung": (21, 8, 15),
    "left_lung": (21, 6, 23),
    "heart": (6, 6, 6, 8),
    "right_clavicle": (10, 4, 8, 1),
    "left_clavicle": (10, 4, 8, 1),
}
LANDMARK_COUNTS = {s: sum(c) for s, c in PIECE_COUNTS.items()}
CARDIOMEGALY_CTR = 0.5
FIELD_OF_VIEW_MM = 358.4  # JSRT: 2048 px x 0.175 mm; the pixel spacing is this over the image side


class SynthError(HolonsError):
    """Invalid arguments or output folder for a synthetic data generator."""



@dataclass(frozen=True)
class Nodule:
    """A round lesion at a fixed place of one lung.

    ``lateral`` is the offset from the midline in thorax half-widths, ``height`` the depth below
    the apex in lung lengths, so the lesion moves with the lung between acquisitions.
    """

    side: str  # "right" | "left" (patient side)
    lateral: float
    height: float
    diameter_mm: float


@dataclass(frozen=True)
class PhantomParams:
    """Anatomy of one patient (first block) and the settings of one acquisition (second block).

    Lengths are in units of the image side in the canonical (unrotated) frame; ``*_f`` values are
    fractions of the lung length measured down from the lung apex.
    """

    sex: str = "M"
    thorax_half_width: float = 0.37
    apex_y: float = 0.09
    lung_length: float = 0.74
    body_fat: float = 0.06
    neck_half_width: float = 0.085
    shoulder_drop: float = 0.0
    ctr: float = 0.44
    heart_right_share: float = 0.32
    heart_top_f: float = 0.48
    heart_bottom_f: float = 0.91
    right_dome: float = 0.035
    left_dome: float = 0.02
    aortic_knob: float = 0.012
    clavicle_tilt: float = 0.0
    rib_spacing: float = 0.066
    arms: bool = True
    gastric_bubble: bool = True
    breasts: bool = False
    anatomy_seed: int = 0
    nodule: Nodule | None = None
    effusion_side: str | None = None
    effusion_height: float = 0.0
    # acquisition
    inspiration: float = 1.0
    rotation_deg: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    exposure: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.012
    blur_px: float = 0.5

"""holons.anatomy: batched view generation for part-whole pretraining (Adam-v2 style).

The decomposer picks the whole W at a granularity level and cuts it into k x k parts in raster
order (a contract of the trained heads); crops, CutMix-style mixing and radiograph intensity
augmentation all run as batched tensor ops on the images' device.
"""

from holons.anatomy.crops import (
    PAPER_LOCAL_BANDS,
    box_area,
    global_crop_boxes,
    nested_area_bands,
    nested_local_boxes,
    part_local_boxes,
    resample,
    sample_boxes_in,
    sample_views,
    view_affine,
    view_grid,
)
from holons.anatomy.decomposer import (
    PART_ORDER_2X2,
    part_boxes,
    part_cells,
    part_position,
    whole_boxes,
    whole_side,
)
from holons.anatomy.intensity import IntensityConfig, augment_intensity, gaussian_blur, sample_angles
from holons.anatomy.mixing import (
    CutMixConfig,
    CutMixResult,
    box_masks,
    cutmix,
    cutmix_boxes,
    foreground_lambda,
    mix_targets,
    sample_lambda,
    sample_part_swaps,
    sample_partner,
)
from holons.anatomy.views import ViewConfig, ViewGenerator, Views, make_views

__all__ = [
    "PAPER_LOCAL_BANDS",
    "PART_ORDER_2X2",
    "CutMixConfig",
    "CutMixResult",
    "IntensityConfig",
    "ViewConfig",
    "ViewGenerator",
    "Views",
    "augment_intensity",
    "box_area",
    "box_masks",
    "cutmix",
    "cutmix_boxes",
    "foreground_lambda",
    "gaussian_blur",
    "global_crop_boxes",
    "make_views",
    "mix_targets",
    "nested_area_bands",
    "nested_local_boxes",
    "part_boxes",
    "part_cells",
    "part_local_boxes",
    "part_position",
    "resample",
    "sample_angles",
    "sample_boxes_in",
    "sample_lambda",
    "sample_part_swaps",
    "sample_partner",
    "sample_views",
    "view_affine",
    "view_grid",
    "whole_boxes",
    "whole_side",
]

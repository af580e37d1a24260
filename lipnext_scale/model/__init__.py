from lipnext_scale.model.lipnext import SIZES, LipNeXt, build_lipnext

__all__ = ["SIZES", "LipNeXt", "build_lipnext"]

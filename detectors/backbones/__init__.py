"""Backbones. Swin is the one the papers tune."""
from detectors.backbones.swin import (OUT_FEATURES, SWIN_SPECS, SwinBackbone, SwinBlock, build_swin,
                                      load_swin_weights, read_state_dict)

__all__ = ["OUT_FEATURES", "SWIN_SPECS", "SwinBackbone", "SwinBlock", "build_swin", "load_swin_weights",
           "read_state_dict"]

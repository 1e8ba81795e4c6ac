"""A backbone worth tuning on every machine: the synthetic upstream task and its pre-training."""
from detectors.upstream.data import upstream_batch
from detectors.upstream.pretraining import (UpstreamSpec, cached, check_cache_writable, check_fits, ensure_pretrained,
                                         install, pretrain, read_metrics, spec_from)

__all__ = ["UpstreamSpec", "cached", "check_cache_writable", "check_fits", "ensure_pretrained", "install",
           "pretrain", "read_metrics", "spec_from", "upstream_batch"]

"""Inference: loading a trained run (`loading`), generation (`sampling`, `penalties`),
weight-only quantization (`quantize`) and the exported format (`pretrained`)."""

"""Planning GPU and TPU runs on a CPU host: the compiled program (`program`), the batch
and token searches (`search`), and the targets (`targets`: the GPU cards of
`gpu_targets` and the TPU generations of `tpu_targets`, compiled without the device;
`compile_only` holds what both kinds of deviceless compile share)."""

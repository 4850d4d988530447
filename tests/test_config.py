"""vesperjax.config: the model config's choices agree with what the kernels run."""


def test_attention_choices_are_the_kernels_implementations():
  """model.attention_impl accepts what vesperjax.kernels.attention runs, no more."""
  from vesperjax import config
  from vesperjax.kernels import _attention
  assert set(config.ATTENTION_IMPLS) - {None} == set(_attention.IMPLEMENTATIONS)

"""CPU-sized models on the embedded corpus: minutes on two cores."""

from prism_jax.config import (CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig,
                              OptimizerConfig, TrainConfig)
from experiments import PROTOTYPE_LOSSES, dense_twin, prototype_head, register


@register
def prism_tiny() -> ExperimentConfig:
  return ExperimentConfig(
      name="prism_tiny",
      model=ModelConfig(head="prism", vocab_size=8192, d_model=128, num_layers=4, num_heads=4,
                        d_ff=352, max_seq_len=128),
      prototypes=prototype_head(num_prototypes=1024),  # M = 8 D
      losses=PROTOTYPE_LOSSES,
      data=DataConfig(seq_len=128, batch_size=16),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=100),
      train=TrainConfig(steps=1000, log_every=25, eval_every=500, eval_batches=16),
      checkpoint=CheckpointConfig(every=500, keep=3),
  )


@register
def dense_tiny() -> ExperimentConfig:
  return dense_twin(prism_tiny(), "dense_tiny")

"""The CPU comparison study: PRISM vs dense, about an hour each on two cores."""

from prism_jax.config import (CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig,
                              OptimizerConfig, TrainConfig)
from experiments import PROTOTYPE_LOSSES, dense_twin, prototype_head, register


@register
def prism_small() -> ExperimentConfig:
  return ExperimentConfig(
      name="prism_small",
      model=ModelConfig(head="prism", vocab_size=8192, d_model=256, num_layers=6, num_heads=8,
                        d_ff=704, max_seq_len=256),
      # M = 8 D; k = D / 4 as at prism_tiny: the mixture's map from h is linear of rank at
      # most k within a region of fixed selection, and at k = D / 8 (32) the whole split was
      # 3.9% behind dense_small, at D / 4 (64) 2.3% (docs/evaluate.md, the eighth round).
      prototypes=prototype_head(num_prototypes=2048, top_k=64),
      losses=PROTOTYPE_LOSSES,
      # 2048 tokens a step, as prism_tiny: the study's CPU budget goes to model size, not batch.
      data=DataConfig(seq_len=128, batch_size=16),
      optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=200),
      train=TrainConfig(steps=2000, log_every=50, eval_every=500, eval_batches=32),
      checkpoint=CheckpointConfig(every=500, keep=3),
  )


@register
def dense_small() -> ExperimentConfig:
  return dense_twin(prism_small(), "dense_small")

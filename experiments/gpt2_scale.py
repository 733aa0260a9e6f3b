"""Accelerator-scale models sized like GPT-2 124M / 355M / 1.5B backbones plus the bank.

They train on a real tfds text dataset prepared in `data.data_dir` (C4/FineWeb-style, with a
`text` feature) and a 50k sentencepiece tokenizer; bfloat16 compute over float32 weights,
layers scanned and rematerialised, parameters FSDP-sharded, the bank on the model axis.
"""

import dataclasses

from prism_jax.config import (CheckpointConfig, DataConfig, ExperimentConfig, MeshConfig,
                              ModelConfig, OptimizerConfig, TrainConfig)
from experiments import PROTOTYPE_LOSSES, dense_twin, prototype_head, register

_DATA = DataConfig(dataset="c4/en:3.1.0", data_dir="gs://YOUR_BUCKET/tensorflow_datasets",
                   tokenizer="gs://YOUR_BUCKET/tokenizers/spm_50k.model", seq_len=2048,
                   batch_size=256)


# The TPU slice each experiment is planned for: `make plan EXP=prism_1b` (no TOPOLOGY) plans
# and compiles for it; the figures are in docs/scaling.md.
PLANNED_TOPOLOGIES = {
    "prism_130m": "v5p-8", "dense_130m": "v5p-8",
    "prism_350m": "v5p-32", "dense_350m": "v5p-32",
    "prism_1b": "v5p-128", "dense_1b": "v5p-128",
}


def _scaled(name, d_model, num_layers, num_heads, d_ff, num_prototypes, top_k, lr, steps,
            batch_size, remat="dots", mesh=MeshConfig(data=1, fsdp=-1, model=1)):
  return ExperimentConfig(
      name=name,
      model=ModelConfig(head="prism", vocab_size=50304, d_model=d_model, num_layers=num_layers,
                        num_heads=num_heads, d_ff=d_ff, max_seq_len=2048, scan_layers=True,
                        remat=remat, compute_dtype="bfloat16", param_dtype="float32"),
      # The head's [B, L, M] tensors 256 positions at a time (8 blocks of the 2048): at
      # prism_1b they took 11% of the train step's memory per chip, 1.3% in blocks
      # (docs/evaluate.md, "prism_1b: what the head costs on the pod plan").
      prototypes=prototype_head(num_prototypes, top_k, score_blocks=8),
      losses=PROTOTYPE_LOSSES,
      data=dataclasses.replace(_DATA, batch_size=batch_size),
      optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=2000, weight_decay=0.1),
      train=TrainConfig(steps=steps, log_every=50, eval_every=2000, eval_batches=64),
      mesh=mesh,
      checkpoint=CheckpointConfig(every=1000, keep=3),
  )


@register
def prism_130m() -> ExperimentConfig:
  return _scaled("prism_130m", 768, 12, 12, 2048, 6144, 32, 6e-4, 50_000, 256)  # M = 8 D


@register
def prism_350m() -> ExperimentConfig:
  return _scaled("prism_350m", 1024, 24, 16, 2816, 8192, 32, 3e-4, 100_000, 256)  # M = 8 D


@register
def prism_1b() -> ExperimentConfig:
  # d_model=1600 = 2^6 * 25: FSDP over 32 devices, data parallel across groups of 32, so
  # every slice from 32 to thousands of chips divides it.
  return _scaled("prism_1b", 1600, 48, 25, 4352, 16384, 32, 2e-4, 100_000, 512, remat="full",
                 mesh=MeshConfig(data=-1, fsdp=32, model=1))


@register
def dense_130m() -> ExperimentConfig:
  return dense_twin(prism_130m(), "dense_130m")


@register
def dense_350m() -> ExperimentConfig:
  return dense_twin(prism_350m(), "dense_350m")


@register
def dense_1b() -> ExperimentConfig:
  return dense_twin(prism_1b(), "dense_1b")

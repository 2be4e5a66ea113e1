"""Post-training: fine-tuning, distillation, quantization and pruning of checkpoints (see docs/post.md).

- `quantize`: int8 / int4 weights with a scale and zero point per output channel or group.
- `prune`: magnitude pruning of the projection matrices, with masks kept through fine-tuning.
- `distill`: a student trained on alpha * CE + (1 - alpha) * tau^2 * KL to a frozen teacher.
- `finetune`: the trainer from a checkpoint (shards), or prompt/completion JSONL with completion-only loss.
- `common`: reading/writing checkpoints and measuring perplexity, size and speed.
"""

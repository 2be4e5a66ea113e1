"""Alignment: chat templates and chat fine-tuning data, reward models, DPO, and RLHF (RLOO).

Built on gpt2kit checkpoints; every stage writes a checkpoint the rest of gpt2kit opens unchanged.
See docs/align.md.
"""

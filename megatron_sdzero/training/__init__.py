"""The Megatron training loop (setup, step, checkpoints, logging, signals, packing) and `sdzero sft`.

See docs/training.md. Submodules are imported on use: importing this package imports no Megatron.
"""

"""The training core: the trainer, its loop, checkpoints, optimizer, strategies and progress."""

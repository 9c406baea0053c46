"""What the training loop (``lens_fast/train.py``) uses that is not the loop itself: the config, the
GRPO objective's maths, the mask loss, rollout rewards, validation, checkpoints and the metrics log."""

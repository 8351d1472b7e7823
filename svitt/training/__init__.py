"""The training engine: the one loop for pretraining and finetuning (train), its resumable
checkpoints, learning-rate schedule, mixed precision, GradCache for large contrastive batches and
device/launcher helpers."""

"""What the recipes share to train: the Trainer classes and loop (trainer), the model (model),
callbacks (λ, tokens, progress) and resumable checkpoints (resume)."""

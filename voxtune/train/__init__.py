"""Training: losses and the pieces a fine-tuning loop is built from."""

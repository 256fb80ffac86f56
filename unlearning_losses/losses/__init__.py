"""The loss functions, one module per family."""

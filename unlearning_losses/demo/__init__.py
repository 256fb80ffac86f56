"""The demo: train a small language model on fictitious facts, then make it forget some of them."""

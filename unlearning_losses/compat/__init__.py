"""Reproductions of published trainers' numbers from logits, for migration and comparison.

Each function names the quirks of the code it reproduces; the library's own losses fix them. Each
checks all its arguments first, under its own parameter names (``compat.arguments``).
"""

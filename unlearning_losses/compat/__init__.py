"""Reproductions of published trainers' numbers from logits, for migration and comparison.

Each function names the quirks of the code it reproduces; the library's own losses fix them.
"""

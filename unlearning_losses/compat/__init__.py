"""Reproductions of published trainers' numbers from logits, for migration and comparison.

One module per codebase: ``soul`` (SOUL), ``open_unlearning`` (open-unlearning), ``muse`` (MUSE
and Unlearn-Simple's copy of it, and MUSE's task vector) and ``npo`` (the TOFU trainer as the NPO
authors and Unlearn-Simple extended it). Each function names the quirks of the code it
reproduces; the library's own losses fix them. Each checks all its arguments first, under its
own parameter names (``compat.arguments``).
"""

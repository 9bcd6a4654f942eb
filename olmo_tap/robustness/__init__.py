"""Robustness: adversarial suffixes (an attack bank built by GCG), the answer-time probe, and what they measure."""

"""Certainty of an answer: the uncertainty head's p(correct) for multiple choice, Kernel Language Entropy over
sampled answers for free text, which of the two applies (``routing``), and a claim ledger (``claims``)."""

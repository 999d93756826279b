"""The training algorithms as parts of one trainer: SD-Zero Phase 2, SDFT, GRPO (on-policy, in
``onpolicy.py``, each supplying its batch builder and loss) and RFT (sample, filter, SFT).

See docs/algorithms.md for each algorithm, its config and its budget accounting.
"""

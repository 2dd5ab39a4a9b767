"""Data sets for emcaps: smallNORB, MNIST, the SynthNORB renderer, and the paper's preprocessing."""

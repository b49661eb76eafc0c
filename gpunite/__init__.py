"""gpunite: train, fine-tune and serve open language models together, peer to peer, with proof of training."""

__version__ = "0.1.0"

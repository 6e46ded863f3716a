"""dlion: decentralized deep learning across heterogeneous micro-clouds."""

__version__ = "0.1.0"

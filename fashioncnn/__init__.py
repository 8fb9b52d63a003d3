"""fashioncnn: reproducible, tracked hyperparameter sweeps of small CNNs on Fashion-MNIST."""

__version__ = "0.1.0"
